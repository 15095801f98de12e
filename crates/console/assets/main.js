// The console's entry: navigation between views, the theme, signing in and out.

import * as adminView from "./admin.js";
import { byId, say } from "./dom.js";
import { ApiFailure, admin, hasAdminKey, setAdminKey } from "./http.js";
import * as playground from "./playground.js";

const VIEWS = ["playground", "organisations", "usage", "audit", "replicas"];
const ADMIN_VIEWS = new Set(["organisations", "usage", "audit", "replicas"]);
const LOADERS = {
  organisations: adminView.loadOrgs,
  usage: adminView.loadUsage,
  audit: adminView.loadAudit,
  replicas: adminView.loadReplicas,
};
const STATUS = {
  organisations: "orgs-status",
  usage: "usage-status",
  audit: "audit-status",
  replicas: "replicas-status",
};

// ---- Theme: the system's preference until the toggle says otherwise ---------------------

const dark = window.matchMedia("(prefers-color-scheme: dark)");
let chosenTheme = null;

function applyTheme() {
  const theme = chosenTheme || (dark.matches ? "dark" : "light");
  document.documentElement.dataset.theme = theme;
  const toggle = byId("theme-toggle");
  toggle.setAttribute("aria-pressed", String(theme === "dark"));
  toggle.textContent = theme === "dark" ? "Light theme" : "Dark theme";
}

// ---- Views ------------------------------------------------------------------------------

function requested() {
  const name = location.hash.replace(/^#/, "");
  return VIEWS.includes(name) ? name : "playground";
}

async function show() {
  const view = requested();
  const needsSignIn = ADMIN_VIEWS.has(view) && !hasAdminKey();
  for (const name of VIEWS) byId(`view-${name}`).hidden = needsSignIn || name !== view;
  byId("view-signin").hidden = !needsSignIn;
  for (const link of document.querySelectorAll(".tabs a")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (needsSignIn) {
    byId("admin-key").focus();
    return;
  }
  const loader = LOADERS[view];
  if (loader) {
    try {
      await loader();
    } catch (err) {
      if (err instanceof ApiFailure && err.status === 401) signOut("The admin key was refused; sign in again.");
      else say(byId(STATUS[view]), err.message, true);
    }
  }
}

// ---- Signing in and out -----------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  const input = byId("admin-key");
  const status = byId("signin-status");
  setAdminKey(input.value.trim());
  try {
    await admin("/organizations");
  } catch (err) {
    setAdminKey(null);
    if (err.status === 404) {
      say(status, "This server has no admin API: start it with --auth and an admin key.", true);
    } else {
      say(status, err.status === 401 || err.status === 403 ? "This admin key was refused." : err.message, true);
    }
    return;
  }
  input.value = "";
  say(status, "");
  byId("session-state").textContent = "Signed in as admin";
  byId("sign-out").hidden = false;
  byId("nav-replicas").hidden = !(await adminView.hasReplicas());
  await show();
}

function signOut(message) {
  setAdminKey(null);
  byId("session-state").textContent = "Not signed in";
  byId("sign-out").hidden = true;
  byId("nav-replicas").hidden = true;
  say(byId("signin-status"), typeof message === "string" ? message : "Signed out.");
  show();
}

function start() {
  applyTheme();
  dark.addEventListener("change", applyTheme);
  byId("theme-toggle").addEventListener("click", () => {
    chosenTheme = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    applyTheme();
  });
  byId("signin-form").addEventListener("submit", signIn);
  byId("sign-out").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", show);
  playground.setUp();
  adminView.setUp();
  playground.loadModels();
  show();
}

start();
