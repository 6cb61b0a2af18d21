// The reference's "Sample using SignalR Javascript Client", made scriptable for tests.
//
//   node client.mjs '<json config>'        (or the config in $E2E_CLIENT_CONFIG)
//
// Config (JSON object):
//   url               hub URL with its query, e.g. ws://127.0.0.1:5000/v1/hub/entries?site_id=S
//                     (http:// works too; the client maps it to ws:// itself)
//   token             the access token, or null for none
//   tokens            optional list of tokens: the factory returns tokens[n] where n is the
//                     number of onreconnecting events so far (the last one is reused), as an
//                     app that fetches a fresh token for every reconnect would
//   tokenIn           "factory" (default, the reference's accessTokenFactory), "query"
//                     (?access_token=, as a browser sends it) or "none"
//   protocol          "json" (default) or "messagepack"
//   statefulReconnect true: .withStatefulReconnect() (negotiates; WebSockets only)
//   transport         "websockets" (default: skipNegotiation), "negotiated-websockets",
//                     "sse" or "longpolling" (these negotiate first)
//   expect            stop after this many ReceiveMessage calls (0 or absent: never)
//   reconnect         true: .withAutomaticReconnect() (default delays 0, 2, 10, 30 s)
//   reconnectDelays   with reconnect: the retry delays in ms instead of the default ones
//   resume            true: track lastSeq (the seq of the last ReceiveMessage event) and, in
//                     onreconnected, connection.invoke("Resume", lastSeq); also report
//                     "Gap" invocations
//   stopOnReconnecting  true: call stop() from onreconnecting (so a test ends cleanly)
//   stopAfterMs       stop this long after start() resolved (an idle connection test)
//   invoke            optional [method, ...args]: connection.invoke(method, ...args) once
//                     started (a hub method of a server other than hubserver)
//   serverTimeoutMs   connection.serverTimeoutInMilliseconds (default 30000)
//   keepAliveMs       connection.keepAliveIntervalInMilliseconds (default 15000)
//   timeoutMs         give up after this long: print {"event":"timeout"} and exit 3
//   logLevel          signalR.LogLevel name for the stderr log (default "Debug")
//
// Output: one JSON object per line on stdout, in the order things happened:
//   {"event":"started"}                      start() resolved
//   {"event":"start_failed","error":"..."}   start() rejected (exit 2)
//   {"event":"message","data":<argument>}    one ReceiveMessage call
//   {"event":"reconnecting","error":...}     onreconnecting (error text or null)
//   {"event":"reconnected"}                  onreconnected
//   {"event":"resumed","lastSeq":n}          (resume) invoke("Resume", n) resolved
//   {"event":"resume_failed","error":"..."}  (resume) invoke("Resume", n) rejected
//   {"event":"gap","first":n}                (resume) a Gap(n) invocation
//   {"event":"invoked","result":...}         (invoke) the invocation's result
//   {"event":"invoke_failed","error":"..."}  (invoke) the invocation was rejected
//   {"event":"stopping"}                     about to call stop()
//   {"event":"closed","error":...}           onclose (error text or null)
//   {"event":"stopped"}                      stop() resolved (exit 0)
// After "closed" that is not of our own stop(), the process exits 0.

import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

const config = JSON.parse(process.argv[2] ?? process.env.E2E_CLIENT_CONFIG ?? "{}");
const tokenIn = config.tokenIn ?? "factory";
const tokens = config.tokens ?? (config.token == null ? [] : [config.token]);
let generation = 0;
let received = 0;
let lastSeq = 0;
let stopping = false;

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");
}

function exit(code) {
  // A pipe that the reader has not drained yet holds back writes: exit once they are out
  // (process.exit() right away loses them).
  process.stdout.write("", () => process.exit(code));
}

function errorText(error) {
  if (error === undefined || error === null) {
    return null;
  }
  return error instanceof Error ? error.message : String(error);
}

const stderrLogger = {
  threshold: signalR.LogLevel[config.logLevel ?? "Debug"],
  log(level, message) {
    if (level >= this.threshold) {
      process.stderr.write(`${new Date().toISOString()} [${signalR.LogLevel[level]}] ${message}\n`);
    }
  },
};

let url = config.url;
// "websockets" (default): the reference's skipNegotiation; the others negotiate first.
const transports = {
  websockets: signalR.HttpTransportType.WebSockets,
  "negotiated-websockets": signalR.HttpTransportType.WebSockets,
  sse: signalR.HttpTransportType.ServerSentEvents,
  longpolling: signalR.HttpTransportType.LongPolling,
};
const transportName = config.transport ?? "websockets";
if (!(transportName in transports)) {
  throw new Error(`unknown transport ${transportName}`);
}
const options = {
  skipNegotiation: transportName === "websockets",
  transport: transports[transportName],
};
if (tokenIn === "factory" && tokens.length > 0) {
  options.accessTokenFactory = () => tokens[Math.min(generation, tokens.length - 1)];
} else if (tokenIn === "query" && tokens.length > 0) {
  url += (url.includes("?") ? "&" : "?") + `access_token=${encodeURIComponent(tokens[0])}`;
}

let builder = new signalR.HubConnectionBuilder().withUrl(url, options);
if (config.protocol === "messagepack") {
  builder = builder.withHubProtocol(new MessagePackHubProtocol());
} else if (config.protocol !== undefined && config.protocol !== "json") {
  throw new Error(`unknown protocol ${config.protocol}`);
}
if (config.statefulReconnect) {
  builder = builder.withStatefulReconnect();
}
if (config.reconnect) {
  builder = config.reconnectDelays
    ? builder.withAutomaticReconnect(config.reconnectDelays)
    : builder.withAutomaticReconnect();
}
const connection = builder.configureLogging(stderrLogger).build();
if (config.serverTimeoutMs !== undefined) {
  connection.serverTimeoutInMilliseconds = config.serverTimeoutMs;
}
if (config.keepAliveMs !== undefined) {
  connection.keepAliveIntervalInMilliseconds = config.keepAliveMs;
}

async function stop() {
  if (stopping) {
    return;
  }
  stopping = true;
  emit("stopping");
  await connection.stop();
  emit("stopped");
  exit(0);
}

connection.on("ReceiveMessage", (message) => {
  emit("message", { data: message });
  if (config.resume) {
    lastSeq = JSON.parse(message).seq;
  }
  received += 1;
  if (config.expect && received === config.expect) {
    void stop();
  }
});

connection.onreconnecting((error) => {
  generation += 1;
  emit("reconnecting", { error: errorText(error) });
  if (config.stopOnReconnecting) {
    void stop();
  }
});

if (config.resume) {
  connection.on("Gap", (first) => emit("gap", { first }));
}

connection.onreconnected(() => {
  emit("reconnected");
  if (config.resume) {
    const since = lastSeq;
    connection.invoke("Resume", since).then(
      () => emit("resumed", { lastSeq: since }),
      (error) => emit("resume_failed", { error: errorText(error) }),
    );
  }
});

connection.onclose((error) => {
  emit("closed", { error: errorText(error) });
  if (!stopping) {
    exit(0);
  }
});

if (config.timeoutMs) {
  setTimeout(() => {
    emit("timeout");
    exit(3);
  }, config.timeoutMs).unref();
}

try {
  await connection.start();
} catch (error) {
  emit("start_failed", { error: errorText(error) });
  exit(2);
}
emit("started");
if (config.invoke) {
  const [method, ...args] = config.invoke;
  connection.invoke(method, ...args).then(
    (result) => emit("invoked", { result }),
    (error) => emit("invoke_failed", { error: errorText(error) }),
  );
}
if (config.stopAfterMs) {
  setTimeout(() => void stop(), config.stopAfterMs);
}
