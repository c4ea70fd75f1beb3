// Drives keel's operator page in headless Chromium against a live `keel serve`.
// Run by crates/keel/tests/it/operator_page.rs, which starts keel and passes:
//   KEEL_BASE           the server's base URL
//   KEEL_OPERATOR_KEY   an operator key
//   KEEL_ORG_ADMIN_KEY  an `admin` key of the organisation `acme`
//   KEEL_COMMAND_IDS    two commands of `acme`, claimed with a 5 s lease and max_attempts 1
//   KEEL_SCREENSHOTS    where the screenshots go
//   KEEL_CHROMIUM       the Chromium binary
// Each step prints one line; any failure exits non-zero with the reason.
import { chromium } from "playwright-core";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const base = need("KEEL_BASE");
const operatorKey = need("KEEL_OPERATOR_KEY");
const orgAdminKey = need("KEEL_ORG_ADMIN_KEY");
const [commandId, otherId] = need("KEEL_COMMAND_IDS").split(",");
const screenshots = need("KEEL_SCREENSHOTS");
const executablePath = process.env.KEEL_CHROMIUM || "/usr/bin/chromium";
const PANIC_MESSAGE = "injected by the browser test";

function need(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

function step(what) {
  console.log(`step: ${what}`);
}

function check(condition, what) {
  if (!condition) throw new Error(`check failed: ${what}`);
}

async function call(method, path, token, body) {
  const response = await fetch(base + path, {
    method,
    headers: {
      ...(token ? { Authorization: `Bearer ${token}` } : {}),
      ...(body === undefined ? {} : { "Content-Type": "application/json" }),
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

const profile = mkdtempSync(join(tmpdir(), "keel-chromium-"));
mkdirSync(screenshots, { recursive: true });
const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  viewport: { width: 1280, height: 800 },
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
context.setDefaultTimeout(20_000);

try {
  const page = context.pages()[0] || await context.newPage();
  page.on("dialog", (dialog) => dialog.accept());
  page.on("pageerror", (error) => console.log(`page error: ${error.message}`));
  let navigations = 0;
  page.on("framenavigated", (frame) => { if (frame === page.mainFrame()) navigations += 1; });

  step("open /ui/: the sign-in form is shown");
  await page.goto(base + "/ui/");
  await page.locator("#sign-in").waitFor({ state: "visible" });
  check(await page.locator("#main").isHidden(), "the operator sections are hidden before sign-in");

  step("a wrong key is refused with a message");
  await page.fill("#key", "not-an-operator-key");
  await page.click("#sign-in-form button[type=submit]");
  await page.locator("#sign-in-error", { hasText: "not accepted" }).waitFor();

  step("sign in with the operator key, from the keyboard");
  await page.focus("#key");
  await page.keyboard.press("ControlOrMeta+A");
  await page.keyboard.type(operatorKey);
  await page.keyboard.press("Enter");
  await page.locator("#main").waitFor({ state: "visible" });
  const cookies = await context.cookies(base);
  const session = cookies.find((c) => c.name === "keel_session");
  check(session, "a keel_session cookie is set");
  check(session.httpOnly, "the session cookie is HttpOnly");
  check(session.sameSite === "Strict", "the session cookie is SameSite=Strict");
  check(session.expires > Date.now() / 1000, "the session cookie has an expiry");
  check(await page.evaluate(() => document.cookie.includes("keel_session")) === false,
    "scripts cannot read the session cookie");
  await page.locator("#panics-total", { hasText: "No panics" }).waitFor();
  await page.locator("#components tbody tr").first().waitFor();
  await page.locator("#paused-queues tbody tr", { hasText: "nightly-q" }).waitFor();
  await page.locator("#schedules tbody tr", { hasText: "nightly cleanup" }).locator("td", { hasText: "30 2 * * * (Europe/Berlin)" }).waitFor();
  await page.locator("#agents tbody tr", { hasText: "web-1" }).locator(".state.cordoned").waitFor();
  const navigationsAfterSignIn = navigations;
  await page.evaluate(() => { window.__keelNotReloaded = true; });

  step("a panic injected through the failpoint commands.release_stuck appears without reloading");
  const panicked = await call("POST", "/v1/commands/release-stuck", orgAdminKey, {});
  check(panicked.status === 500, `the injected panic answers 500 (got ${panicked.status})`);
  await page.locator("#panic-groups details", { hasText: PANIC_MESSAGE }).waitFor();
  await page.locator("#panics-total", { hasText: "1 panic" }).waitFor();
  check(navigations === navigationsAfterSignIn, "the page did not navigate");
  check(await page.evaluate(() => window.__keelNotReloaded === true), "the page was not reloaded");
  const group = page.locator("#panic-groups details", { hasText: PANIC_MESSAGE });
  await group.locator("summary").focus();
  await page.keyboard.press("Enter");
  await group.locator("dd", { hasText: ".rs:" }).first().waitFor();
  check(await group.evaluate((node) => node.open), "the panic opens to its details from the keyboard");

  step("the claimed commands die when their leases expire, and show as dead letters");
  const deadline = Date.now() + 30_000;
  const dead = new Set();
  while (dead.size < 2) {
    const released = await call("POST", "/v1/commands/release-stuck", orgAdminKey, {});
    check(released.status === 200, `release-stuck answers 200 (got ${released.status})`);
    for (const r of released.body.released) if (r.outcome === "dead") dead.add(r.command_id);
    check(Date.now() < deadline, "the commands died within 30 s");
    if (dead.size < 2) await new Promise((resolve) => setTimeout(resolve, 500));
  }
  const row = page.locator(`#dead tr[data-command="${commandId}"]`);
  const otherRow = page.locator(`#dead tr[data-command="${otherId}"]`);
  await row.waitFor();
  await otherRow.waitFor();
  await page.locator("#status-counts li", { hasText: "dead" }).locator("b", { hasText: "2" }).waitFor();

  step("requeue it with a click, then check it over the API");
  await row.getByRole("button", { name: `Requeue ${commandId}` }).click();
  await page.locator("#notice", { hasText: "Requeued 1 command" }).waitFor();
  await row.waitFor({ state: "detached" });
  const requeued = await call("GET", `/v1/commands/${commandId}`, orgAdminKey);
  check(requeued.status === 200 && requeued.body.status === "pending" && requeued.body.attempts === 0,
    `the command is pending again with no attempts (got ${JSON.stringify(requeued.body)})`);
  check((await call("GET", `/v1/commands/${otherId}`, orgAdminKey)).body.status === "dead",
    "the other one is still dead");

  step("requeue the other as a selection, chosen from the keyboard");
  await otherRow.getByRole("checkbox").focus();
  await page.keyboard.press("Space");
  check(await otherRow.getByRole("checkbox").isChecked(), "the checkbox is checked");
  await page.click("#requeue-selected");
  await page.locator("#notice", { hasText: "Requeued 1 command" }).waitFor();
  await otherRow.waitFor({ state: "detached" });
  const other = await call("GET", `/v1/commands/${otherId}`, orgAdminKey);
  check(other.body.status === "pending" && other.body.attempts === 0,
    `the selected command is pending again (got ${JSON.stringify(other.body)})`);

  step("create an organisation");
  await page.fill("#org-name", "browser-org");
  await page.click("#org-form button[type=submit]");
  await page.locator("#notice", { hasText: "Organisation browser-org created" }).waitFor();
  check(await page.locator("#org-select").inputValue() === "browser-org", "the new organisation is selected");

  step("create a key: its token is shown once and works");
  await page.fill("#key-name", "browser-key");
  await page.click("#key-form button[type=submit]");
  await page.locator("#new-token").waitFor({ state: "visible" });
  const token = (await page.locator("#token-value").textContent()).trim();
  check(token.length > 20, "a token is shown");
  check((await call("GET", "/v1/commands", token)).status === 200, "the new key opens /v1/commands");
  await page.click("#token-dismiss");
  check(await page.locator("#new-token").isHidden(), "the token is gone once dismissed");
  check(!(await page.content()).includes(token), "the token is nowhere in the page any more");
  const keyRow = page.locator("#keys tbody tr", { hasText: "browser-key" });
  await keyRow.locator(".state", { hasText: "active" }).waitFor();

  step("revoke it: it stops working");
  await keyRow.getByRole("button", { name: "Revoke key browser-key" }).click();
  await keyRow.locator(".state", { hasText: "revoked" }).waitFor();
  check((await call("GET", "/v1/commands", token)).status === 401, "the revoked key is refused");

  step("edit a job interval and save the log filters");
  await page.fill("#interval-retention", "15m");
  await page.locator("#interval-retention").press("Enter");
  await page.locator("#notice", { hasText: "The interval of retention is now 15m" }).waitFor();
  const jobs = await call("GET", "/v1/admin/jobs", operatorKey);
  check(jobs.body.some((job) => job.name === "retention" && job.interval_ms === 900_000),
    "the retention job's interval is 15 minutes over the API");
  await page.click("#filters-form button[type=submit]");
  await page.locator("#notice", { hasText: "Log filters saved" }).waitFor();

  step("a state-changing request without the CSRF token is refused");
  const withoutCsrf = await page.evaluate(async () => {
    const response = await fetch("/v1/admin/organisations", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name: "csrf-probe" }),
    });
    return { status: response.status, body: await response.json() };
  });
  check(withoutCsrf.status === 403 && withoutCsrf.body.error.code === "forbidden",
    `403 forbidden without the CSRF token (got ${JSON.stringify(withoutCsrf)})`);
  const probe = await call("GET", "/v1/admin/organisations", operatorKey);
  check(!probe.body.some((org) => org.name === "csrf-probe"), "nothing was created");

  step("screenshots at 1280x800 and at phone width (390x844)");
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: join(screenshots, "operator-page-1280x800.png") });
  await page.screenshot({ path: join(screenshots, "operator-page-1280x800-full.png"), fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: join(screenshots, "operator-page-390x844.png") });
  await page.screenshot({ path: join(screenshots, "operator-page-390x844-full.png"), fullPage: true });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 0) {
    const wide = await page.evaluate(() => [...document.querySelectorAll("body *")]
      .filter((node) => node.getBoundingClientRect().right > window.innerWidth + 1)
      .slice(0, 5)
      .map((node) => node.tagName + "#" + node.id + "." + node.className));
    console.log(`too wide at phone width: ${wide.join(", ")}`);
  }
  check(overflow <= 0, `no sideways scrolling at phone width (${overflow}px too wide)`);
  await page.setViewportSize({ width: 1280, height: 800 });

  step("sign out: the session ends");
  await page.click("#sign-out");
  await page.locator("#sign-in").waitFor({ state: "visible" });
  const after = await page.evaluate(async () => (await fetch("/v1/admin/components")).status);
  check(after === 401, `the operator API refuses the page after sign-out (got ${after})`);

  console.log(`screenshots: ${screenshots}`);
  console.log("operator page: every step passed");
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
