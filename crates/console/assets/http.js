// Talking to the server. Credentials live in this module's variables only: never in
// storage, never in a URL; reloading the page forgets them.

const credentials = { admin: null, api: null };

/** An error answered by the server (its OpenAI-shaped message), or a network failure. */
export class ApiFailure extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function setAdminKey(key) {
  credentials.admin = key || null;
}

export function hasAdminKey() {
  return credentials.admin !== null;
}

export function setApiKey(key) {
  credentials.api = key || null;
}

function headers(key, extra) {
  const h = new Headers(extra || {});
  if (key) h.set("Authorization", `Bearer ${key}`);
  return h;
}

/** The message of an error answer, from its `{"error": {"message": ...}}` body if it has one. */
export async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") {
      message = body.error.message;
    }
  } catch (_) {
    // Not JSON: the status line says enough.
  }
  return new ApiFailure(response.status, message);
}

async function send(path, key, { method = "GET", body, signal, accept } = {}) {
  const init = { method, headers: headers(key, accept ? { Accept: accept } : {}), signal };
  if (body !== undefined) {
    init.headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiFailure(0, `The server could not be reached: ${err.message}`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

/** A call to the admin API (`/admin/v1` + `path`), answered as JSON. */
export async function admin(path, options) {
  const response = await send(`/admin/v1${path}`, credentials.admin, options);
  return response.json();
}

/** A call to the admin API answered as a file (`Blob`). */
export async function adminBlob(path) {
  const response = await send(`/admin/v1${path}`, credentials.admin);
  return response.blob();
}

/** A call to the OpenAI API (`/v1` + `path`); the `Response` itself, for streaming. */
export function openai(path, options) {
  return send(`/v1${path}`, credentials.api, options);
}
