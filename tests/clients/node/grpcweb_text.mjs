// Calls the service with the grpc-web JavaScript client (npm `grpc-web`, as
// protoc-gen-grpc-web's code calls it) in its default text mode (`grpcwebtext`), on Node
// with an XMLHttpRequest from npm `xhr2`. Messages are encoded and decoded with the
// schemas protoc-gen-es made (web/gen/). Prints one JSON line per call: the response
// (proto3 JSON; a streaming RPC's as {"messages": [...]}) or {"error": {"code", "message"}}.
//
//   node tests/clients/node/grpcweb_text.mjs '<plan as JSON>'
//
// plan: {"baseUrl", "calls": [{"rpc", "request", "token"?}]}

import XMLHttpRequest from "xhr2";
import grpcWeb from "grpc-web";
import { fromBinary, fromJson, toBinary, toJson } from "@bufbuild/protobuf";
import {
  ExportCouponsRequestSchema,
  ExportCouponsResponseSchema,
  GetCampaignRequestSchema,
  GetCampaignResponseSchema,
  IssueCouponRequestSchema,
  IssueCouponResponseSchema,
} from "../../../web/gen/coupon/v1/coupon_pb.js";

globalThis.XMLHttpRequest = XMLHttpRequest;
const { GrpcWebClientBase, MethodDescriptor, MethodType } = grpcWeb;

const RPCS = {
  GetCampaign: [GetCampaignRequestSchema, GetCampaignResponseSchema, MethodType.UNARY],
  IssueCoupon: [IssueCouponRequestSchema, IssueCouponResponseSchema, MethodType.UNARY],
  ExportCoupons: [
    ExportCouponsRequestSchema,
    ExportCouponsResponseSchema,
    MethodType.SERVER_STREAMING,
  ],
};

// What protoc-gen-grpc-web's code would hold: the message's class is not used by the
// runtime, only the two functions.
function descriptor(rpc) {
  const [input, output, kind] = RPCS[rpc];
  return new MethodDescriptor(
    `/coupon.v1.CouponService/${rpc}`,
    kind,
    Object,
    Object,
    (message) => toBinary(input, message),
    (bytes) => toJson(output, fromBinary(output, bytes)),
  );
}

function call(client, baseUrl, spec) {
  const [input, , kind] = RPCS[spec.rpc];
  const method = descriptor(spec.rpc);
  const url = `${baseUrl}${method.getName()}`;
  const request = fromJson(input, spec.request);
  const metadata = spec.token ? { authorization: `Bearer ${spec.token}` } : {};
  const failed = (error) => ({ error: { code: error.code, message: error.message } });
  if (kind === MethodType.UNARY) {
    return new Promise((resolve) => {
      client.rpcCall(url, request, metadata, method, (error, response) =>
        resolve(error ? failed(error) : { response }),
      );
    });
  }
  return new Promise((resolve) => {
    const messages = [];
    const stream = client.serverStreaming(url, request, metadata, method);
    stream.on("data", (message) => messages.push(message));
    stream.on("error", (error) => resolve(failed(error)));
    stream.on("end", () => resolve({ response: { messages } }));
  });
}

const plan = JSON.parse(process.argv[2]);
const client = new GrpcWebClientBase({ format: "text" });
for (const spec of plan.calls) {
  console.log(JSON.stringify(await call(client, plan.baseUrl, spec)));
}
