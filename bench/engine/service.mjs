// The order saga as a Restate workflow with durable promises, for the
// comparison in BENCHMARKS.md (not part of orderflow).
//
// One journaled step per orderflow worker: generate-info, payment-wait, the
// payment decision (the "payment" promise's completion, which the engine
// journals), the provider's charge, order-completed / order-cancelled.
// The client waits for the payment step through the "awaiting" promise and
// submits through "payment", as orderflow's client long-polls and POSTs.
import * as restate from "@restatedev/restate-sdk";
import { randomUUID } from "node:crypto";

// Node 20 lacks Promise.withResolvers (Node 22+), which the SDK uses per request.
Promise.withResolvers ??= function () {
  let resolve, reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  return { promise, resolve, reject };
};

// haidilao refuses unionpay, as in `orderflow bench`.
const METHODS = { haidilao: ["zhifubao", "weixin"], default: ["zhifubao", "weixin", "unionpay"] };

const order = restate.workflow({
  name: "OrderWorkflow",
  handlers: {
    run: async (ctx, req) => {
      ctx.set("status", "started");
      const info = await ctx.run("generate-info", () => ({
        amount_cents: 100 * req.products.reduce((s, p) => s + p.quantity, 0) + 990,
        payment_methods: METHODS[req.supplier] ?? METHODS.default,
      }));
      const step = await ctx.run("payment-wait", () => ({ token: randomUUID(), ...info }));
      ctx.set("status", "awaiting_payment");
      await ctx.promise("awaiting").resolve(step);
      const payment = await ctx.promise("payment");
      if (payment.token !== step.token || !step.payment_methods.includes(payment.method)) {
        await ctx.run("order-cancelled", () => "cancelled");
        ctx.set("status", "cancelled");
        return { status: "cancelled" };
      }
      const capture = await ctx.run(`charge-${payment.method}`, async () => ({
        capture_id: randomUUID(),
        charged_cents: step.amount_cents,
      }));
      await ctx.run("order-completed", () => "completed");
      ctx.set("status", "completed");
      return { status: "completed", ...capture };
    },
    awaitPayment: async (ctx) => ctx.promise("awaiting").get(),
    submitPayment: async (ctx, payment) => {
      await ctx.promise("payment").resolve(payment);
    },
  },
});

restate.serve({ services: [order], port: 9080 });
