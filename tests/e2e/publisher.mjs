// The official JavaScript client as a publisher on /v1/hub/publish, made scriptable for tests.
//
//   node publisher.mjs '<json config>'
//
// Config (JSON object):
//   url              the publisher hub's URL, e.g. http://127.0.0.1:5000/v1/hub/publish
//   token            the access token (accessTokenFactory)
//   protocol         "json" (default) or "messagepack"
//   negotiate        true: negotiate first (default: skipNegotiation, WebSockets)
//   calls            a list of {"hub": ..., "events": ..., "send": bool}: each is
//                    connection.invoke("Publish", hub, events), or with "send" true
//                    connection.send(...) (fire-and-forget), in order
//
// Output: one JSON line per step: {"event":"started"}, then per call
// {"event":"result","value":...} or {"event":"error","error":"..."} (invoke) or
// {"event":"sent"} (send), then {"event":"stopped"}. Exits 0, or 2 if start() failed.

import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

const config = JSON.parse(process.argv[2] ?? "{}");

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");
}

const options = { accessTokenFactory: () => config.token };
if (!config.negotiate) {
  options.skipNegotiation = true;
  options.transport = signalR.HttpTransportType.WebSockets;
}
let builder = new signalR.HubConnectionBuilder().withUrl(config.url, options);
if (config.protocol === "messagepack") {
  builder = builder.withHubProtocol(new MessagePackHubProtocol());
}
const connection = builder.configureLogging(signalR.LogLevel.Warning).build();

try {
  await connection.start();
} catch (error) {
  emit("start_failed", { error: String(error?.message ?? error) });
  process.stdout.write("", () => process.exit(2));
}
emit("started");
for (const call of config.calls ?? []) {
  if (call.send) {
    await connection.send("Publish", call.hub, call.events);
    emit("sent");
    continue;
  }
  try {
    const value = await connection.invoke("Publish", call.hub, call.events);
    emit("result", { value });
  } catch (error) {
    emit("error", { error: String(error?.message ?? error) });
  }
}
await connection.stop();
emit("stopped");
process.stdout.write("", () => process.exit(0));
