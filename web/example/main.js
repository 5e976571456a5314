// The example page's script: issue a coupon from a browser with connect-web.
// Bundled by `npm run build:example` into src/coupon/entrypoints/static/example/app.js.

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";
import { CouponService } from "../gen/coupon/v1/coupon_pb.js";

const form = document.querySelector("#issue");
const result = document.querySelector("#result");
const fields = ["api", "campaign", "user", "transport"];

// Query parameters fill the form, so that a link can carry the API, campaign and user.
const query = new URLSearchParams(location.search);
form.elements.api.value = query.get("api") || location.origin;
for (const name of fields.slice(1)) {
  if (query.has(name)) form.elements[name].value = query.get(name);
}

function transportFor(baseUrl, kind) {
  // The Connect protocol in JSON (readable in the network tab), or gRPC-Web in binary.
  return kind === "grpcweb"
    ? createGrpcWebTransport({ baseUrl, useBinaryFormat: true })
    : createConnectTransport({ baseUrl });
}

function show(state, title, detail) {
  result.dataset.state = state;
  result.querySelector("h2").textContent = title;
  result.querySelector("p").textContent = detail;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const { api, campaign, user, transport } = form.elements;
  const client = createClient(CouponService, transportFor(api.value.trim(), transport.value));
  show("pending", "Issuing…", "");
  try {
    const response = await client.issueCoupon({
      campaignId: campaign.value.trim(),
      userId: user.value.trim(),
    });
    const coupon = response.coupon;
    show(
      response.alreadyIssued ? "again" : "ok",
      coupon.code,
      response.alreadyIssued
        ? `${coupon.userId} already had this coupon`
        : `issued to ${coupon.userId}`,
    );
  } catch (err) {
    const error = ConnectError.from(err);
    show("error", error.code ? codeName(error.code) : "error", error.rawMessage);
  }
});

// The code as the Connect protocol spells it (ResourceExhausted -> resource_exhausted).
const codeName = (code) => Code[code].replace(/[A-Z]/g, (c, i) => (i ? "_" : "") + c.toLowerCase());

document.body.dataset.ready = "true";
