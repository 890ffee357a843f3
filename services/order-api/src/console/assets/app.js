// orderflow console: plain JavaScript, no build step, served by the order API.
// Customers' pages use the public API; operators' pages send the operator
// token (kept in this tab's sessionStorage) as `Authorization: Bearer`.
"use strict";

const main = document.getElementById("main");
let stopPage = () => {};
let catalogue = null;

// ---- helpers -----------------------------------------------------------

/** An element with attributes (on* as listeners) and children (text is text). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function money(cents) {
  if (cents === null || cents === undefined) return "-";
  const sign = cents < 0 ? "-" : "";
  const abs = Math.abs(cents);
  return `${sign}${Math.floor(abs / 100)}.${String(abs % 100).padStart(2, "0")}`;
}

function short(id) {
  return id ? String(id).slice(-8) : "-";
}

function time(iso) {
  return iso ? new Date(iso).toISOString().slice(11, 23) : "-";
}

function badge(text, kind) {
  return h("span", { class: `badge ${kind || text}` }, text);
}

function token() {
  return sessionStorage.getItem("orderflow-operator-token") || "";
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** JSON from the API; operator calls carry the token. */
async function api(path, options = {}) {
  const headers = { Accept: "application/json" };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  if (options.operator) headers.Authorization = `Bearer ${token()}`;
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, body.error || response.statusText);
  return body;
}

/** What an operator page shows when the token is missing or refused. */
function operatorProblem(error) {
  if (error.status === 401 || error.status === 403) {
    return h("div", { class: "card", id: "operator-problem" },
      h("p", { class: "error" }, error.message),
      h("p", { class: "muted" }, "Enter the operator token (ORDERFLOW_OPERATOR_TOKEN) at the top right."));
  }
  return h("p", { class: "error" }, error.message);
}

/** Asks before a change; resolves to whether the operator confirmed. */
function confirmAction(text) {
  const modal = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  modal.hidden = false;
  return new Promise((resolve) => {
    const done = (answer) => {
      modal.hidden = true;
      yes.removeEventListener("click", onYes);
      no.removeEventListener("click", onNo);
      resolve(answer);
    };
    const yes = document.getElementById("confirm-yes");
    const no = document.getElementById("confirm-no");
    const onYes = () => done(true);
    const onNo = () => done(false);
    yes.addEventListener("click", onYes);
    no.addEventListener("click", onNo);
  });
}

async function loadCatalogue() {
  if (!catalogue) catalogue = await api("/catalogue");
  return catalogue;
}

function methodName(method) {
  const all = (catalogue?.merchants || []).flatMap((m) => m.payment_methods)
    .concat(catalogue?.default_payment_methods || []);
  const found = all.find((m) => m.method === method);
  return found ? `${found.display_name} (pays ${found.discount_percent} %)` : method;
}

// ---- place an order ------------------------------------------------------

async function newOrderPage() {
  const data = await loadCatalogue();
  const merchant = h("select", { id: "merchant" },
    data.merchants.map((m) => h("option", { value: m.supplier }, m.display_name)),
    h("option", { value: "corner-shop" }, "Corner shop (any method)"));
  const methods = h("p", { class: "muted", id: "merchant-methods" });
  const showMethods = () => {
    const found = data.merchants.find((m) => m.supplier === merchant.value);
    const list = found ? found.payment_methods : data.default_payment_methods;
    methods.textContent = `Accepts: ${list.map((m) => `${m.display_name} (pays ${m.discount_percent} %)`).join(", ")}`;
  };
  merchant.addEventListener("change", showMethods);
  showMethods();
  const rows = data.products.map((p) => h("tr", {},
    h("td", {}, p.name, h("div", { class: "muted mono" }, p.sku)),
    h("td", {}, money(p.price_cents)),
    h("td", {}, h("input", { type: "number", min: "0", max: "99", value: "0", id: `qty-${p.sku}`, "data-sku": p.sku }))));
  const address = h("input", { id: "address", value: "1 Harbour Road", size: "40" });
  const problem = h("p", { class: "error", id: "place-error" });
  const form = h("form", { class: "card", id: "order-form" },
    h("label", { for: "merchant" }, "Merchant"), merchant, methods,
    h("table", { class: "products" },
      h("thead", {}, h("tr", {}, h("th", {}, "Product"), h("th", {}, "Price"), h("th", {}, "Quantity"))),
      h("tbody", {}, rows)),
    h("label", { for: "address" }, "Delivery address"), address,
    h("p", {}, h("button", { type: "submit", class: "primary", id: "place" }, "Place the order")),
    problem);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    problem.textContent = "";
    const products = [...form.querySelectorAll("input[data-sku]")]
      .map((input) => ({ sku: input.dataset.sku, quantity: Number(input.value) }))
      .filter((line) => line.quantity > 0);
    if (products.length === 0) {
      problem.textContent = "Choose at least one product.";
      return;
    }
    try {
      const placed = await api("/orders", {
        method: "POST",
        body: { supplier: merchant.value, products, address: address.value },
      });
      location.hash = `#/orders/${encodeURIComponent(placed.order_id)}`;
    } catch (error) {
      problem.textContent = error.message;
    }
  });
  main.replaceChildren(h("h1", {}, "Place an order"),
    h("p", { class: "muted" }, "As a customer would through the API: the server prices it; then pay it on its page."),
    form);
}

// ---- an order's page ---------------------------------------------------

function detailText(detail) {
  if (!detail || typeof detail !== "object") return "";
  const parts = [];
  if (detail.supplier) parts.push(detail.supplier);
  if (Array.isArray(detail.products)) parts.push(`${detail.products.reduce((n, l) => n + (Number(l.quantity) || 0), 0)} item(s)`);
  if (detail.method || detail.provider) parts.push(detail.method || detail.provider);
  if (detail.amount_cents !== undefined) parts.push(`amount ${money(detail.amount_cents)}`);
  if (detail.charged_cents !== undefined) parts.push(`charged ${money(detail.charged_cents)}`);
  if (detail.refunded_cents !== undefined) parts.push(`refunded ${money(detail.refunded_cents)}`);
  if (detail.step) parts.push(`step ${detail.step}`);
  if (Array.isArray(detail.payment_methods)) parts.push(`methods ${detail.payment_methods.join("/")}`);
  if (detail.reason) parts.push(`reason: ${detail.reason}`);
  return parts.join(", ");
}

async function orderPage(orderId) {
  await loadCatalogue().catch(() => null);
  const status = h("span", { id: "status" }, badge("…", "started"));
  const facts = h("div", { id: "facts" });
  const pay = h("div", { id: "pay-box" });
  const saga = h("div", { id: "saga" }, h("p", { class: "muted" }, "The coordinator has not recorded this order yet."));
  const timeline = h("ol", { class: "timeline", id: "timeline" });
  const live = h("span", { class: "muted", id: "live" }, "connecting…");
  main.replaceChildren(
    h("h1", {}, "Order ", h("code", {}, orderId), " ", status),
    h("div", { class: "grid" },
      h("div", { class: "card" }, h("h2", {}, "The order"), facts, pay),
      h("div", { class: "card" }, h("h2", {}, "Its saga"), saga)),
    h("div", { class: "card" }, h("h2", {}, "Timeline ", live), timeline));

  let order = null;
  let sagaState = null;
  const seen = new Map();

  const renderOrder = () => {
    status.replaceChildren(badge(order.status));
    facts.replaceChildren(h("table", {}, h("tbody", {},
      [["Merchant", order.supplier], ["Amount", money(order.amount_cents)],
        ["Method", order.method], ["Charged", money(order.charged_cents)],
        ["Refunded", money(order.refunded_cents)], ["Cancelled because", order.cancel_reason],
        ["Last rejection", order.last_rejection]]
        .filter(([, value]) => value !== null && value !== undefined && value !== "-")
        .map(([name, value]) => h("tr", {}, h("th", {}, name), h("td", {}, value))))));
    if (order.status === "awaiting_payment" && order.payment_token) {
      if (!pay.querySelector("#pay")) {
        const method = h("select", { id: "pay-method" },
          (order.payment_methods || []).map((m) => h("option", { value: m }, methodName(m))));
        const problem = h("p", { class: "error", id: "pay-error" });
        const button = h("button", { class: "primary", id: "pay" }, "Pay");
        button.addEventListener("click", async () => {
          button.disabled = true;
          try {
            await api(`/orders/${encodeURIComponent(orderId)}/payment`, {
              method: "POST", body: { token: order.payment_token, method: method.value },
            });
            pay.replaceChildren(h("p", { class: "notice", id: "paid" }, `Payment with ${method.value} submitted; the coordinator decides.`));
          } catch (error) {
            problem.textContent = error.message;
            button.disabled = false;
          }
        });
        pay.replaceChildren(h("h2", {}, "Pay"), h("label", { for: "pay-method" }, "Payment method"), method, " ", button, problem);
      }
    } else if (pay.querySelector("#pay") || ["completed", "cancelled"].includes(order.status)) {
      pay.replaceChildren();
    }
  };

  const renderSaga = () => {
    if (!sagaState) return;
    const now = Date.now();
    const rows = (sagaState.deadlines || []).map((d) => {
      const left = Math.max(0, Math.round((new Date(d.due_at).getTime() - now) / 1000));
      return h("tr", {}, h("td", {}, d.step), h("td", { class: "mono" }, new Date(d.due_at).toISOString().replace("T", " ").slice(0, 19)),
        h("td", { class: "countdown" }, `${left} s left`));
    });
    saga.replaceChildren(
      h("p", {}, "Status ", badge(sagaState.status, sagaState.status === "running" ? "started" : sagaState.status),
        sagaState.step ? [" — waits on ", h("strong", { id: "waits-on" }, sagaState.step)] : null),
      rows.length ? h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Timer"), h("th", {}, "Due (UTC)"), h("th", {}, "Time left"))), h("tbody", {}, rows))
        : h("p", { class: "muted" }, "No timer armed."));
  };

  const addEntry = (entry) => {
    if (seen.has(entry.message_id)) return;
    seen.set(entry.message_id, entry);
    const caused = entry.causation_id && seen.has(entry.causation_id);
    timeline.append(h("li", { class: `${entry.kind}${caused ? " caused" : ""}`, "data-name": entry.name, "data-kind": entry.kind },
      h("span", { class: "mono muted" }, time(entry.recorded_at)), " ", badge(entry.kind), " ",
      h("span", { class: "entry-name" }, entry.name), " ",
      h("span", {}, detailText(entry.detail)), " ",
      h("span", { class: "mono muted", title: entry.message_id }, `#${short(entry.message_id)}`),
      entry.causation_id ? h("span", { class: "mono muted", title: entry.causation_id }, ` ← ${short(entry.causation_id)}`) : null));
  };

  const source = new EventSource(`/orders/${encodeURIComponent(orderId)}/live`);
  source.addEventListener("open", () => { live.textContent = "live"; });
  source.addEventListener("error", () => { live.textContent = "reconnecting…"; });
  source.addEventListener("order", (event) => { order = JSON.parse(event.data); renderOrder(); });
  source.addEventListener("saga", (event) => { sagaState = JSON.parse(event.data); renderSaga(); });
  source.addEventListener("entry", (event) => addEntry(JSON.parse(event.data)));
  source.addEventListener("problem", (event) => { live.textContent = JSON.parse(event.data).error; });
  const ticking = setInterval(renderSaga, 1000);
  stopPage = () => { source.close(); clearInterval(ticking); };
}

// ---- the choreography --------------------------------------------------

function layers(model) {
  const publishers = [...model.clients.map((c) => ({ name: c.name, publishes: c.publishes, client: true })),
    ...model.services.map((s) => ({ ...s, client: false }))];
  const matches = (pattern, key) => {
    const p = pattern.split("."); const k = key.split(".");
    const go = (i, j) => {
      if (i === p.length) return j === k.length;
      if (p[i] === "#") return go(i + 1, j) || (j < k.length && go(i, j + 1));
      if (j === k.length) return false;
      return (p[i] === "*" || p[i] === k[j]) && go(i + 1, j + 1);
    };
    return go(0, 0);
  };
  const edges = [];
  for (const from of publishers) {
    for (const to of model.services) {
      if (from.name === to.name) continue;
      const keys = from.publishes.filter((key) => to.consumes.some((p) => matches(p, key)));
      if (keys.length) edges.push({ from: from.name, to: to.name, keys });
    }
  }
  const layer = new Map(model.clients.map((c) => [c.name, 0]));
  let changed = true;
  while (changed) {
    changed = false;
    for (const edge of edges) {
      if (layer.has(edge.from) && !layer.has(edge.to)) {
        layer.set(edge.to, layer.get(edge.from) + 1);
        changed = true;
      }
    }
  }
  for (const s of model.services) if (!layer.has(s.name)) layer.set(s.name, 1);
  return { publishers, edges, layer };
}

function diagram(model, queues) {
  const { publishers, edges, layer } = layers(model);
  const columns = new Map();
  for (const node of publishers) {
    const l = layer.get(node.name) ?? 1;
    if (!columns.has(l)) columns.set(l, []);
    columns.get(l).push(node);
  }
  const width = 210; const height = 58; const gapX = 90; const gapY = 22;
  const position = new Map();
  let maxRows = 0;
  for (const [l, nodes] of columns) {
    maxRows = Math.max(maxRows, nodes.length);
    nodes.forEach((node, row) => position.set(node.name, { x: 10 + l * (width + gapX), y: 10 + row * (height + gapY) }));
  }
  const totalWidth = 20 + (Math.max(...columns.keys()) + 1) * (width + gapX);
  const totalHeight = 20 + maxRows * (height + gapY);
  const byService = new Map((queues?.queues || []).map((q) => [q.service, q]));
  const lines = edges.map((edge) => {
    const a = position.get(edge.from); const b = position.get(edge.to);
    const x1 = a.x + width; const y1 = a.y + height / 2; const x2 = b.x; const y2 = b.y + height / 2;
    const bend = Math.max(40, Math.abs(x2 - x1) / 2);
    const path = x2 > x1 ? `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}`
      : `M${a.x + width / 2},${a.y + height} C${a.x + width / 2},${a.y + height + 60} ${b.x + width / 2},${b.y + height + 60} ${b.x + width / 2},${b.y + height}`;
    return svg("path", { class: "edge", d: path, "marker-end": "url(#arrow)" },
      svg("title", {}, `${edge.from} → ${edge.to}: ${edge.keys.join(", ")}`));
  });
  const nodes = publishers.map((node) => {
    const p = position.get(node.name);
    const q = byService.get(node.name);
    const status = node.client ? "client" : (q ? q.status : "");
    const figures = q ? `${q.messages_ready} waiting · ${q.consumers} consumer(s)${q.dead_letters ? ` · ${q.dead_letters} dead` : ""}` : (node.client ? "publishes from outside" : "");
    return svg("g", { class: `node ${status}`, "data-service": node.name, transform: `translate(${p.x},${p.y})` },
      svg("rect", { width, height, rx: 6 }),
      svg("text", { x: 10, y: 22, "font-weight": 600 }, node.name),
      svg("text", { x: 10, y: 42 }, figures),
      svg("title", {}, `${node.name}\npublishes: ${node.publishes.join(", ") || "-"}${node.consumes ? `\nconsumes: ${node.consumes.join(", ")}` : ""}`));
  });
  return svg("svg", { id: "diagram", viewBox: `0 0 ${totalWidth} ${totalHeight + 70}`, width: "100%" },
    svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto-start-reverse" },
      svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#8d99ae" }))),
    lines, nodes);
}

function rate(value) {
  return value === null || value === undefined ? "-" : `${value.toFixed(1)}/s`;
}

async function choreographyPage() {
  const model = await api("/console/api/choreography", { operator: true });
  const figures = h("div", { id: "queues" });
  const picture = h("div", { class: "card", id: "diagram-box" });
  const findings = h("div", { class: "card", id: "findings" },
    h("h2", {}, "Lint of the choreography"),
    model.findings.length === 0
      ? h("p", { id: "sound" }, "Sound: every event published is consumed, every event consumed is published, every wait has a timer and a compensation.")
      : h("ul", { class: "findings" }, model.findings.map((f) => h("li", { "data-kind": f.kind }, badge(f.kind, "no_consumer"), " ", f.message))));
  const waits = h("div", { class: "card" }, h("h2", {}, "Waits on the outside"),
    h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Step"), h("th", {}, "Waits on"), h("th", {}, "Opened by"), h("th", {}, "Timer"), h("th", {}, "Compensation"))),
      h("tbody", {}, model.waits.map((w) => h("tr", {}, h("td", {}, w.step), h("td", {}, w.waits_on), h("td", { class: "mono" }, w.opened_by.join(", ")),
        h("td", {}, w.timer ? `${w.timer.name} → ${w.timer.fires}` : "none"), h("td", { class: "mono" }, w.compensation || "none"))))));
  main.replaceChildren(h("h1", {}, "Choreography"), picture, figures, findings, waits);

  const refresh = async () => {
    let queues = null;
    try {
      queues = await api("/console/api/queues", { operator: true });
    } catch (error) {
      figures.replaceChildren(operatorProblem(error));
    }
    picture.replaceChildren(h("h2", {}, "Services and the events between them"),
      h("p", { class: "muted" }, "Arrows go from who publishes an event to who consumes it (hover for the events). Red: no consumer or backing up; purple: paused."),
      diagram(model, queues));
    if (!queues) return;
    const rows = queues.queues.map((q) => h("tr", { class: q.status, "data-service": q.service },
      h("td", {}, q.service, h("div", { class: "mono muted" }, q.queue)),
      h("td", { class: "depth" }, q.messages_ready), h("td", { class: "consumers" }, q.consumers),
      h("td", {}, rate(q.publish_rate)), h("td", {}, rate(q.deliver_rate)), h("td", {}, rate(q.ack_rate)),
      h("td", {}, q.dead_letters ? h("a", { href: "#/dead-letters" }, q.dead_letters) : "0"),
      h("td", { class: "status" }, badge(q.status)),
      h("td", {}, h("button", {
        class: q.paused ? "" : "danger", "data-action": q.paused ? "resume" : "pause",
        onclick: async () => {
          const action = q.paused ? "resume" : "pause";
          const text = q.paused ? `Resume ${q.service}? Its consumers drain its queue.`
            : `Pause ${q.service}? Its queue fills and its orders wait at its step while their timers run.`;
          if (!(await confirmAction(text))) return;
          try {
            await api(`/console/api/services/${encodeURIComponent(q.service)}/${action}`, { method: "POST", operator: true });
          } catch (error) {
            alert(error.message);
          }
          refresh();
        },
      }, q.paused ? "Resume" : "Pause"))));
    figures.replaceChildren(h("div", { class: "card" },
      h("h2", {}, "Queues ", h("span", { class: "muted" }, `(from ${queues.source === "management" ? "the management API" : "passive declarations: no rates"})`)),
      h("table", {}, h("thead", {}, h("tr", {}, ["Service", "Waiting", "Consumers", "In", "Out", "Acked", "Dead letters", "Status", ""].map((t) => h("th", {}, t)))),
        h("tbody", {}, rows))));
  };
  await refresh();
  const timer = setInterval(refresh, 2000);
  stopPage = () => clearInterval(timer);
}

// ---- dead letters --------------------------------------------------------

async function deadLettersPage() {
  const data = await api("/console/api/dead-letters", { operator: true });
  const result = h("p", { class: "notice", id: "replay-result", hidden: true });
  const replay = async (service, messageId, count) => {
    const text = messageId ? `Replay message ${messageId} onto ${service}'s queue?`
      : `Replay all ${count} dead letter(s) of ${service} onto its queue?`;
    if (!(await confirmAction(text))) return;
    try {
      const done = await api(`/console/api/dead-letters/${encodeURIComponent(service)}/replay`, {
        method: "POST", operator: true, body: messageId ? { message_id: messageId } : {},
      });
      result.textContent = done.summary;
    } catch (error) {
      result.textContent = error.message;
    }
    result.hidden = false;
    await deadLettersPage();
    main.prepend(result);
  };
  const cards = data.services.filter((s) => s.count > 0).map((s) => h("div", { class: "card", "data-service": s.service },
    h("h2", {}, `${s.service} `, h("span", { class: "muted" }, `${s.count} dead letter(s) in ${s.queue}`), " ",
      h("button", { class: "danger replay-all", onclick: () => replay(s.service, null, s.count) }, "Replay all")),
    h("table", {}, h("thead", {}, h("tr", {}, ["Failed at", "Event", "Order", "Reason", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, s.messages.map((m) => h("tr", { class: "dead-letter", "data-message-id": m.message_id || "" },
        h("td", { class: "mono" }, m.failed_at || "-"),
        h("td", { class: "mono" }, m.routing_key),
        h("td", { class: "mono" }, m.order_id ? h("a", { href: `#/orders/${encodeURIComponent(m.order_id)}` }, short(m.order_id)) : "-"),
        h("td", {}, h("div", { class: "reason" }, m.reason), h("pre", { class: "body" }, m.body)),
        h("td", {}, m.message_id ? h("button", { class: "replay-one", onclick: () => replay(s.service, m.message_id) }, "Replay") : null)))))));
  main.replaceChildren(h("h1", {}, "Dead letters"),
    ...(cards.length ? cards : [h("p", { id: "no-dead-letters" }, "No dead letters: every service handled what it was sent.")]));
}

// ---- stuck sagas -----------------------------------------------------------

async function sagasPage() {
  const older = h("input", { id: "older-than", type: "number", min: "0", value: "60", size: "6" });
  const list = h("div", { id: "stuck" });
  const load = async () => {
    const data = await api(`/console/api/sagas/stuck?older_than_secs=${Number(older.value) || 0}`, { operator: true });
    list.replaceChildren(data.sagas.length === 0 ? h("p", {}, "No running saga is stuck that long.")
      : h("table", {}, h("thead", {}, h("tr", {}, ["Order", "Waits on", "Last progress (UTC)", "Started (UTC)"].map((t) => h("th", {}, t)))),
        h("tbody", {}, data.sagas.map((s) => h("tr", {},
          h("td", { class: "mono" }, h("a", { href: `#/orders/${encodeURIComponent(s.order_id)}` }, s.order_id)),
          h("td", {}, s.step || "-"), h("td", { class: "mono" }, s.updated_at), h("td", { class: "mono" }, s.created_at))))));
  };
  main.replaceChildren(h("h1", {}, "Stuck sagas"),
    h("div", { class: "card" }, h("label", { for: "older-than" }, "No progress for at least (seconds)"), older, " ",
      h("button", { onclick: () => load().catch((e) => list.replaceChildren(operatorProblem(e))) }, "Look"), list));
  await load();
}

// ---- routing -------------------------------------------------------------

async function route() {
  stopPage();
  stopPage = () => {};
  const hash = location.hash || "#/";
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.getAttribute("href") === hash);
  }
  try {
    const order = hash.match(/^#\/orders\/(.+)$/);
    if (order) await orderPage(decodeURIComponent(order[1]));
    else if (hash === "#/choreography") await choreographyPage();
    else if (hash === "#/dead-letters") await deadLettersPage();
    else if (hash === "#/sagas") await sagasPage();
    else await newOrderPage();
  } catch (error) {
    main.replaceChildren(error instanceof ApiError ? operatorProblem(error) : h("p", { class: "error" }, String(error)));
  }
}

document.getElementById("search").addEventListener("submit", (event) => {
  event.preventDefault();
  const id = document.getElementById("search-id").value.trim();
  if (id) location.hash = `#/orders/${encodeURIComponent(id)}`;
});
document.getElementById("token").value = token();
document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("orderflow-operator-token", document.getElementById("token").value.trim());
  route();
});
window.addEventListener("hashchange", route);
route();
