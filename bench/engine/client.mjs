// node client.mjs ORDERS CONCURRENCY
//
// Drives the workflow in service.mjs the way `orderflow bench` drives
// orderflow: start the order, wait for its payment step, submit the payment,
// wait for the end; CONCURRENCY orders in flight. Prints one JSON line.
const [orders, conc] = process.argv.slice(2).map(Number);
const base = process.env.RESTATE_INGRESS ?? "http://127.0.0.1:8080";
const run = `${Date.now()}`;
// As `orderflow bench`: haidilao refuses unionpay, the others take every method.
const SUPPLIERS = ["haidilao", "noodle-bar", "sichuan-kitchen"];
async function post(path, body) {
  const r = await fetch(base + path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body ?? null) });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
  const t = await r.text();
  return t ? JSON.parse(t) : null;
}
async function one(i) {
  const id = `${run}-${i}`;
  const supplier = SUPPLIERS[i % SUPPLIERS.length];
  const t0 = performance.now();
  await post(`/OrderWorkflow/${id}/run/send`, { supplier, products: [{ sku: "hotpot", quantity: 1 + (i % 3) }], address: "1 Road" });
  const step = await post(`/OrderWorkflow/${id}/awaitPayment`);
  const bad = i % 20 === 19;
  const allowed = step.payment_methods;
  // Exactly one order in twenty pays with a method its merchant refuses (cancelled).
  const refused = ["zhifubao", "weixin", "unionpay"].find((m) => !allowed.includes(m)) ?? "bitcoin";
  const method = bad ? refused : allowed[Math.floor(i / SUPPLIERS.length) % allowed.length];
  await post(`/OrderWorkflow/${id}/submitPayment`, { token: step.token, method });
  const r = await fetch(`${base}/restate/workflow/OrderWorkflow/${id}/attach`);
  const out = await r.json();
  const ok = out.status === (bad ? "cancelled" : "completed");
  return { ms: performance.now() - t0, ok };
}
const lat = []; let failures = 0; let next = 0;
const t0 = performance.now();
await Promise.all(Array.from({ length: conc }, async () => {
  while (next < orders) {
    const i = next++;
    try { const o = await one(i); lat.push(o.ms); if (!o.ok) failures++; } catch (e) { failures++; console.error(e.message); }
  }
}));
const wall = (performance.now() - t0) / 1000;
lat.sort((a, b) => a - b);
const pct = (p) => lat[Math.min(lat.length - 1, Math.ceil((p / 100) * lat.length) - 1)];
console.log(JSON.stringify({ engine: "restate", orders, concurrency: conc, orders_per_s: orders / wall, p50_ms: pct(50), p95_ms: pct(95), p99_ms: pct(99), max_ms: pct(100), failures }));
