// A headless Chromium for the browser tests, driven over stdin/stdout as JSON lines.
//
//   node browser.mjs            (CHROMIUM=/path/to/chromium, default /usr/bin/chromium)
//
// It launches the system's Chromium once (playwright-core drives it over the DevTools
// protocol; nothing is downloaded) and serves, on its own 127.0.0.1 port (so on
// another origin than the hub server), browser_page.html and the official browser
// bundles of @microsoft/signalr and @microsoft/signalr-protocol-msgpack from
// node_modules. Then, per command on stdin:
//   {"cmd":"open","page":ID,"config":{...}}   a fresh browser context (no shared cache or
//                                             cookies), the page, and startClient(config)
//   {"cmd":"close","page":ID}                 close that page's context (its connections end)
//   {"cmd":"quit"}                            close the browser and exit (so does stdin's end)
// Output, one JSON object per line:
//   {"event":"ready","origin":"http://127.0.0.1:PORT","version":"..."}
//   {"page":ID,"event":...}     what the page reports (started, start_failed, message, closed)
//   {"page":ID,"event":"console","type":"error","text":"..."}   the page's console
//   {"page":ID,"event":"opened"} / {"page":ID,"event":"page_closed"}
//   {"event":"error","error":"..."}   a command failed

import { readFile } from "node:fs/promises";
import http from "node:http";
import { createRequire } from "node:module";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);
const signalrDir = path.dirname(require.resolve("@microsoft/signalr/package.json"));
const msgpackDir = path.dirname(require.resolve("@microsoft/signalr-protocol-msgpack/package.json"));
const FILES = {
  "/page.html": [path.join(here, "browser_page.html"), "text/html; charset=utf-8"],
  "/signalr.min.js": [path.join(signalrDir, "dist/browser/signalr.min.js"), "text/javascript"],
  "/signalr-protocol-msgpack.min.js": [
    path.join(msgpackDir, "dist/browser/signalr-protocol-msgpack.min.js"),
    "text/javascript",
  ],
};

function emit(fields) {
  process.stdout.write(JSON.stringify(fields) + "\n");
}

const server = http.createServer(async (request, response) => {
  const file = FILES[new URL(request.url, "http://x").pathname];
  if (file === undefined) {
    response.writeHead(404).end();
    return;
  }
  const body = await readFile(file[0]);
  response.writeHead(200, { "content-type": file[1], "cache-control": "no-store" }).end(body);
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const origin = `http://127.0.0.1:${server.address().port}`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // Containers give /dev/shm 64 MiB; Chromium's renderers would crash on it.
  args: ["--disable-dev-shm-usage"],
});
const contexts = new Map();

async function open(id, config) {
  const context = await browser.newContext();
  contexts.set(id, context);
  const page = await context.newPage();
  await page.exposeFunction("report", (fields) => emit({ page: id, ...fields }));
  page.on("console", (message) => {
    emit({ page: id, event: "console", type: message.type(), text: message.text() });
  });
  page.on("pageerror", (error) => emit({ page: id, event: "console", type: "pageerror", text: String(error) }));
  await page.goto(`${origin}/page.html`);
  emit({ page: id, event: "opened" });
  await page.evaluate((c) => window.startClient(c), config);
}

async function close(id) {
  const context = contexts.get(id);
  contexts.delete(id);
  if (context !== undefined) {
    await context.close();
  }
  emit({ page: id, event: "page_closed" });
}

let quitting = false;
async function quit() {
  if (quitting) {
    return;
  }
  quitting = true;
  await browser.close();
  server.close();
  process.stdout.write("", () => process.exit(0));
}

emit({ event: "ready", origin, version: browser.version() });

const lines = readline.createInterface({ input: process.stdin });
lines.on("line", async (line) => {
  let command;
  try {
    command = JSON.parse(line);
    if (command.cmd === "open") {
      await open(command.page, command.config);
    } else if (command.cmd === "close") {
      await close(command.page);
    } else if (command.cmd === "quit") {
      await quit();
    } else {
      throw new Error(`unknown command ${line}`);
    }
  } catch (error) {
    emit({ event: "error", page: command?.page, error: String(error) });
  }
});
lines.on("close", quit);
