// Runs a list of RPCs against the service with connect-es's Node client, on the transport
// and wire format given, and prints one JSON line per call: the response (proto3 JSON) or
// the error's code and message, with the response headers and trailers seen. A streaming
// RPC's response is {"messages": [...]}, each in proto3 JSON.
//
//   node tests/clients/node/calls.mjs '<plan as JSON>'
//
// plan: {"baseUrl", "transport": "connect" | "grpc" | "grpcweb", "binary": bool,
//        "httpVersion": "1.1" | "2", "calls": [{"rpc", "request", "token"?, "headers"?}]}
// A request string "$N.a.b" is replaced by field a.b of the response of call N, and
// "$x*N" (in a request or a header) by N letters x: a request or header list too large.

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { fromJson, toJson } from "@bufbuild/protobuf";
import {
  CouponService,
  CreateCampaignRequestSchema,
  CreateCampaignResponseSchema,
  ExportCouponsRequestSchema,
  ExportCouponsResponseSchema,
  GetCampaignRequestSchema,
  GetCampaignResponseSchema,
  IssueCouponRequestSchema,
  IssueCouponResponseSchema,
} from "../../../web/gen/coupon/v1/coupon_pb.js";

const RPCS = {
  CreateCampaign: ["createCampaign", CreateCampaignRequestSchema, CreateCampaignResponseSchema],
  GetCampaign: ["getCampaign", GetCampaignRequestSchema, GetCampaignResponseSchema],
  IssueCoupon: ["issueCoupon", IssueCouponRequestSchema, IssueCouponResponseSchema],
  ExportCoupons: ["exportCoupons", ExportCouponsRequestSchema, ExportCouponsResponseSchema],
};
const STREAMING = new Set(["ExportCoupons"]);

function transportFor(plan) {
  const options = { baseUrl: plan.baseUrl, useBinaryFormat: plan.binary };
  switch (plan.transport) {
    case "connect":
      return createConnectTransport({ ...options, httpVersion: plan.httpVersion });
    case "grpc":
      return createGrpcTransport(options); // always HTTP/2
    case "grpcweb":
      return createGrpcWebTransport({ ...options, httpVersion: plan.httpVersion });
    default:
      throw new Error(`unknown transport ${plan.transport}`);
  }
}

function resolve(value, results) {
  if (typeof value === "string" && /^\$x\*\d+$/.test(value)) {
    return "x".repeat(Number(value.slice(3)));
  }
  if (typeof value === "string" && /^\$\d+\./.test(value)) {
    const [index, ...path] = value.slice(1).split(".");
    return path.reduce((node, key) => node[key], results[Number(index)].response);
  }
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, resolve(v, results)]));
  }
  return value;
}

// "InvalidArgument" -> "invalid_argument", the spelling of the Connect protocol.
const codeName = (code) => Code[code].replace(/[A-Z]/g, (c, i) => (i ? "_" : "") + c.toLowerCase());
const entries = (headers) => Object.fromEntries([...headers.entries()]);

const plan = JSON.parse(process.argv[2]);
const client = createClient(CouponService, transportFor(plan));
const results = [];
for (const call of plan.calls) {
  const [method, requestSchema, responseSchema] = RPCS[call.rpc];
  const request = fromJson(requestSchema, resolve(call.request, results));
  let header = {};
  let trailer = {};
  const options = {
    headers: {
      ...resolve(call.headers ?? {}, results),
      ...(call.token ? { authorization: `Bearer ${call.token}` } : {}),
    },
    onHeader: (h) => (header = entries(h)),
    onTrailer: (t) => (trailer = entries(t)),
  };
  let result;
  try {
    let response;
    if (STREAMING.has(call.rpc)) {
      const messages = [];
      for await (const message of client[method](request, options)) {
        messages.push(toJson(responseSchema, message));
      }
      response = { messages };
    } else {
      response = toJson(responseSchema, await client[method](request, options));
    }
    result = { response, header, trailer };
  } catch (err) {
    const error = ConnectError.from(err);
    result = {
      error: { code: codeName(error.code), message: error.rawMessage },
      metadata: entries(error.metadata),
    };
  }
  results.push(result);
  process.stdout.write(JSON.stringify(result) + "\n");
}
