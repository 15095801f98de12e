// The administration: organisations, projects, keys, usage, the audit log, replicas. Every
// call carries the admin key held in memory by http.js.

import { barChart } from "./charts.js";
import { byId, clear, count, el, say, when } from "./dom.js";
import { admin, adminBlob } from "./http.js";
import { useKey } from "./playground.js";

const state = { orgs: [], org: null, project: null, audit: [] };

const list = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);

function reportTo(statusId, action) {
  return async (...args) => {
    const status = byId(statusId);
    try {
      await action(...args);
    } catch (err) {
      say(status, err.message, true);
    }
  };
}

// ---- Organisations, projects, keys ----------------------------------------------------

export async function loadOrgs() {
  const body = await admin("/organizations");
  state.orgs = body.data || [];
  const listNode = byId("org-list");
  clear(listNode);
  for (const org of state.orgs) {
    listNode.append(el("li", {}, el("button", {
      type: "button",
      "aria-pressed": String(state.org !== null && state.org.id === org.id),
      onclick: () => selectOrg(org.id),
    }, org.name, el("span", { class: "muted" }, ` · ${org.allowed_regions.join(", ")}`))));
  }
  const usageOrg = byId("usage-org");
  const chosen = usageOrg.value;
  clear(usageOrg);
  usageOrg.append(el("option", { value: "" }, "All"));
  for (const org of state.orgs) usageOrg.append(el("option", { value: org.id }, org.name));
  usageOrg.value = state.orgs.some((o) => o.id === chosen) ? chosen : "";
  if (state.org) {
    state.org = state.orgs.find((o) => o.id === state.org.id) || null;
  }
}

async function selectOrg(id) {
  state.org = state.orgs.find((o) => o.id === id) || null;
  state.project = null;
  byId("project-detail").hidden = true;
  await loadOrgs();
  const detail = byId("org-detail");
  detail.hidden = !state.org;
  if (!state.org) return;
  byId("org-detail-title").textContent = state.org.name;
  byId("org-detail-id").textContent = state.org.id;
  byId("org-regions-edit").value = state.org.allowed_regions.join(", ");
  await loadProjects();
}

async function loadProjects() {
  const body = await admin(`/organizations/${encodeURIComponent(state.org.id)}/projects`);
  const listNode = byId("project-list");
  clear(listNode);
  for (const project of body.data || []) {
    const retention = project.retention_secs === null || project.retention_secs === undefined
      ? "content not kept" : `content kept ${project.retention_secs} s`;
    listNode.append(el("li", {}, el("button", {
      type: "button",
      "aria-pressed": String(state.project !== null && state.project.id === project.id),
      onclick: () => selectProject(project),
    }, project.name, el("span", { class: "muted" }, ` · ${retention}`))));
  }
}

async function selectProject(project) {
  state.project = project;
  byId("project-detail").hidden = false;
  byId("project-detail-title").textContent = project.name;
  byId("project-detail-id").textContent = project.id;
  byId("new-key").hidden = true;
  await loadProjects();
  await loadKeys();
}

function limits(policy) {
  const parts = [];
  if (policy.allowed_models && policy.allowed_models.length) parts.push(`models: ${policy.allowed_models.join(", ")}`);
  if (policy.requests_per_minute) parts.push(`${count(policy.requests_per_minute)} req/min`);
  if (policy.tokens_per_minute) parts.push(`${count(policy.tokens_per_minute)} tokens/min`);
  if (policy.budget) parts.push(`budget ${count(policy.budget.tokens)} tokens/${policy.budget.period}`);
  if (policy.expires_at_ms) parts.push(`expires ${when(policy.expires_at_ms)}`);
  return parts.length ? parts.join("; ") : "no limits";
}

async function loadKeys() {
  const body = await admin(`/projects/${encodeURIComponent(state.project.id)}/keys`);
  const tbody = byId("key-table").tBodies[0];
  clear(tbody);
  for (const key of body.data || []) {
    const revoked = key.revoked_at_ms !== null && key.revoked_at_ms !== undefined;
    const action = revoked ? "" : revokeButton(key);
    tbody.append(el("tr", { class: revoked ? "revoked" : "" },
      el("td", {}, key.name),
      el("td", { class: "mono" }, key.id),
      el("td", {}, limits(key.policy || {})),
      el("td", {}, revoked ? `revoked ${when(key.revoked_at_ms)}` : "active"),
      el("td", {}, action)));
  }
}

/** Revoking takes two presses: the first asks, the second does it. */
function revokeButton(key) {
  const button = el("button", { type: "button", class: "danger", "aria-label": `Revoke ${key.name}` }, "Revoke");
  button.addEventListener("click", reportTo("orgs-status", async () => {
    if (button.dataset.confirm !== "yes") {
      button.dataset.confirm = "yes";
      button.textContent = "Confirm revoke";
      return;
    }
    button.disabled = true;
    await admin(`/keys/${encodeURIComponent(key.id)}/revoke`, { method: "POST" });
    say(byId("orgs-status"), `Key ${key.name} revoked.`);
    await loadKeys();
  }));
  return button;
}

function number(id) {
  const v = byId(id).value.trim();
  return v === "" ? undefined : Number(v);
}

function setUpOrganisations() {
  byId("org-form").addEventListener("submit", reportTo("orgs-status", async (event) => {
    event.preventDefault();
    const name = byId("org-name").value.trim();
    const regions = list(byId("org-regions").value);
    const body = { name };
    if (regions.length) body.allowed_regions = regions;
    const org = await admin("/organizations", { method: "POST", body });
    byId("org-form").reset();
    say(byId("orgs-status"), `Organisation ${org.name} created.`);
    await loadOrgs();
    await selectOrg(org.id);
  }));
  byId("org-regions-form").addEventListener("submit", reportTo("orgs-status", async (event) => {
    event.preventDefault();
    const allowed = list(byId("org-regions-edit").value);
    await admin(`/organizations/${encodeURIComponent(state.org.id)}`, { method: "PATCH", body: { allowed_regions: allowed } });
    say(byId("orgs-status"), "Regions saved.");
    await selectOrg(state.org.id);
  }));
  byId("project-form").addEventListener("submit", reportTo("orgs-status", async (event) => {
    event.preventDefault();
    const body = { name: byId("project-name").value.trim() };
    const retention = number("project-retention");
    if (retention !== undefined) body.retention_secs = retention;
    const project = await admin(`/organizations/${encodeURIComponent(state.org.id)}/projects`, { method: "POST", body });
    byId("project-form").reset();
    say(byId("orgs-status"), `Project ${project.name} created.`);
    await selectProject(project);
  }));
  byId("key-form").addEventListener("submit", reportTo("orgs-status", async (event) => {
    event.preventDefault();
    const body = { name: byId("key-name").value.trim(), allowed_models: list(byId("key-models").value) };
    const rpm = number("key-rpm");
    const tpm = number("key-tpm");
    const budget = number("key-budget");
    if (rpm !== undefined) body.requests_per_minute = rpm;
    if (tpm !== undefined) body.tokens_per_minute = tpm;
    if (budget !== undefined) {
      body.budget_tokens = budget;
      body.budget_period = byId("key-period").value;
    }
    const expires = byId("key-expires").value;
    if (expires) body.expires_at = expires;
    const created = await admin(`/projects/${encodeURIComponent(state.project.id)}/keys`, { method: "POST", body });
    byId("key-form").reset();
    byId("new-key-value").textContent = created.key;
    byId("new-key").hidden = false;
    byId("new-key-value").focus();
    say(byId("orgs-status"), `Key ${created.record.name} created.`);
    await loadKeys();
  }));
  const forget = () => {
    byId("new-key-value").textContent = "";
    byId("new-key").hidden = true;
  };
  byId("new-key-copy").addEventListener("click", reportTo("orgs-status", async () => {
    await navigator.clipboard.writeText(byId("new-key-value").textContent);
    say(byId("orgs-status"), "Copied.");
  }));
  byId("new-key-use").addEventListener("click", () => {
    useKey(byId("new-key-value").textContent);
    say(byId("orgs-status"), "The playground now uses this key.");
  });
  byId("new-key-dismiss").addEventListener("click", forget);
}

// ---- Usage ------------------------------------------------------------------------------

function usageQuery(extra) {
  const params = new URLSearchParams();
  const from = byId("usage-from").value;
  const to = byId("usage-to").value;
  const org = byId("usage-org").value;
  if (from) params.set("from", from);
  // `to` is exclusive on the server; the form's day is inclusive.
  if (to) params.set("to", new Date(Date.parse(`${to}T00:00:00Z`) + 86400000).toISOString().slice(0, 10));
  if (org) params.set("org", org);
  for (const [k, v] of Object.entries(extra)) params.set(k, v);
  return `/usage?${params}`;
}

export async function loadUsage() {
  const status = byId("usage-status");
  say(status, "Loading…");
  if (!state.orgs.length) await loadOrgs();
  const body = await admin(usageQuery({ group_by: "org,day" }));
  const rows = body.data || [];
  const names = new Map(state.orgs.map((o) => [o.id, o.name]));
  const days = [...new Set(rows.map((r) => r.group.day))].sort();
  const orgs = [...new Set(rows.map((r) => r.group.org))];
  const series = (metric) => orgs.map((org) => ({
    name: names.get(org) || org,
    values: new Map(rows.filter((r) => r.group.org === org).map((r) => [r.group.day, metric(r)])),
  }));
  const charts = byId("usage-charts");
  clear(charts);
  if (rows.length) {
    charts.append(barChart("Tokens", days, series((r) => r.total_tokens)));
    charts.append(barChart("Requests", days, series((r) => r.requests)));
    // Energy is drawn once the usage records carry it.
    if (rows.some((r) => typeof r.energy_joules === "number")) {
      charts.append(barChart("Energy (J)", days, series((r) => r.energy_joules || 0)));
    }
  }
  const tbody = byId("usage-table").tBodies[0];
  clear(tbody);
  for (const r of rows) {
    tbody.append(el("tr", {},
      el("td", {}, r.group.day),
      el("td", {}, names.get(r.group.org) || r.group.org),
      el("td", { class: "num" }, count(r.requests)),
      el("td", { class: "num" }, count(r.errors)),
      el("td", { class: "num" }, count(r.prompt_tokens)),
      el("td", { class: "num" }, count(r.completion_tokens)),
      el("td", { class: "num" }, count(r.total_tokens))));
  }
  say(status, rows.length ? `${count(rows.length)} organisation-days.` : "No usage in this period.");
}

async function exportUsage(format) {
  const blob = format === "csv"
    ? await adminBlob(usageQuery({ group_by: "org,day", format: "csv" }))
    : new Blob([JSON.stringify(await admin(usageQuery({ group_by: "org,day" })), null, 2)], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: `souverain-usage.${format}` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function setUpUsage() {
  byId("usage-form").addEventListener("submit", reportTo("usage-status", async (event) => {
    event.preventDefault();
    await loadUsage();
  }));
  byId("usage-csv").addEventListener("click", reportTo("usage-status", () => exportUsage("csv")));
  byId("usage-json").addEventListener("click", reportTo("usage-status", () => exportUsage("json")));
}

// ---- Audit ------------------------------------------------------------------------------

function drawAudit() {
  const needle = byId("audit-search").value.trim().toLowerCase();
  const tbody = byId("audit-table").tBodies[0];
  clear(tbody);
  const shown = state.audit.filter((e) => !needle
    || [e.actor, e.action, e.target, e.detail, String(e.seq)].some((f) => String(f).toLowerCase().includes(needle)));
  // Newest first.
  for (const e of [...shown].reverse()) {
    tbody.append(el("tr", {},
      el("td", { class: "num" }, String(e.seq)),
      el("td", {}, when(e.at_ms)),
      el("td", {}, e.actor),
      el("td", {}, e.action),
      el("td", { class: "mono" }, e.target),
      el("td", {}, e.detail)));
  }
  say(byId("audit-status"), `${count(shown.length)} of ${count(state.audit.length)} entries.`);
}

export async function loadAudit() {
  const body = await admin("/audit");
  state.audit = body.data || [];
  drawAudit();
}

async function verifyAudit() {
  const report = await admin("/audit/verify");
  const box = byId("audit-result");
  clear(box);
  box.hidden = false;
  box.className = `verdict ${report.intact ? "ok" : "bad"}`;
  box.append(el("p", { class: "title" }, report.intact
    ? `Verified: the chain of ${count(report.entries)} entries is intact.`
    : `Verification failed: ${count(report.problems.length)} problem(s) in ${count(report.entries)} entries.`));
  if (report.head_hash) box.append(el("p", { class: "mono" }, `head #${report.head_seq}: ${report.head_hash}`));
  if (report.messages && report.messages.length) {
    box.append(el("ul", {}, report.messages.map((m) => el("li", {}, m))));
  }
}

function setUpAudit() {
  byId("audit-search").addEventListener("input", drawAudit);
  byId("audit-refresh").addEventListener("click", reportTo("audit-status", loadAudit));
  byId("audit-verify").addEventListener("click", reportTo("audit-status", verifyAudit));
}

// ---- Replicas (souverain route) -----------------------------------------------------------

/** Whether this server is a router with replicas to show (`GET /admin/v1/replicas`). */
export async function hasReplicas() {
  try {
    await admin("/replicas");
    return true;
  } catch (_) {
    return false;
  }
}

export async function loadReplicas() {
  const body = await admin("/replicas");
  const tbody = byId("replica-table").tBodies[0];
  clear(tbody);
  const percent = (x) => (typeof x === "number" ? `${(x * 100).toFixed(1)} %` : "—");
  for (const r of body.data || []) {
    tbody.append(el("tr", {},
      el("td", {}, r.name),
      el("td", {}, r.engine),
      el("td", {}, r.region),
      el("td", { class: r.healthy ? "healthy" : "unhealthy" }, r.healthy ? "healthy" : "unhealthy"),
      el("td", { class: "num" }, count(r.load.waiting)),
      el("td", { class: "num" }, count(r.load.running)),
      el("td", { class: "num" }, percent(r.load.kv_cache_usage)),
      el("td", { class: "num" }, count(r.in_flight)),
      el("td", { class: "num" }, percent(r.prefix_cache_hit_rate)),
      el("td", { class: "num" }, count(r.routed))));
  }
  say(byId("replicas-status"), `${count((body.data || []).length)} replicas.`);
}

export function setUp() {
  setUpOrganisations();
  setUpUsage();
  setUpAudit();
  byId("replicas-refresh").addEventListener("click", reportTo("replicas-status", loadReplicas));
}
