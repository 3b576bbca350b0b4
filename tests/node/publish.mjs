// Publishes task events the way the application's TypeScript services do, through the two
// clients they use, two majors of each (ioredis 5 and 6, node-redis 4 and 6), and writes what it sent as JSON lines to
// stdout: {id, text, verdict, word}. `verdict` is what the sidecar must do with the entry
// (valid: projected and archived; invalid: dead-lettered with `word` in its reason).
//
//   node publish.mjs <redis-url> <stream> <executions>
import { randomUUID } from "node:crypto";
import Redis from "ioredis";
import Redis6 from "ioredis6";
import { createClient } from "redis";
import { createClient as createClient6 } from "redis6";

const [url, stream, executionCount] = process.argv.slice(2);
const executions = Number(executionCount);
const sent = [];
const started = Date.now() - 60_000;

// What a service's emit() builds: optional fields left undefined (JSON.stringify drops
// them) or null, Date objects for occurredAt (JSON.stringify writes toISOString()) or
// Date.now() milliseconds, nested metadata, fields the contract does not name.
function taskEvent(n, status, step) {
  const at = started + n * 10 + step;
  return {
    eventId: randomUUID(),
    executionId: `node-${n}`,
    taskName: n % 2 ? "deploy" : "run-tests",
    status,
    project: `node-org/repo-${n % 4}`,
    occurredAt: n % 2 ? new Date(at) : at,
    actor: n % 3 === 0 ? { provider: "github", login: "zoë", id: 4242 + n } : undefined,
    prLinks: n % 5 === 0 ? [`https://github.com/node-org/repo/pull/${n}`] : [],
    visibility: n % 7 === 0 ? null : { public: n % 2 === 0 },
    flow: { step, labels: ["ci", "🚀"], retry: undefined },
    durationMs: status === "in_progress" ? undefined : 1234.5,
  };
}

function note(id, text, verdict = "valid", word = "") {
  sent.push({ id: String(id), text, verdict, word });
}

const io = new Redis(url);
const io6 = new Redis6(url);
const nodeRedis = createClient({ url });
const nodeRedis6 = createClient6({ url });
await nodeRedis.connect();
await nodeRedis6.connect();

for (let n = 0; n < executions; n++) {
  const statuses = ["in_progress", "in_progress", n % 4 ? "success" : "error"];
  for (const [step, status] of statuses.entries()) {
    const text = JSON.stringify(taskEvent(n, status, step));
    switch ((n + step) % 6) {
      case 0: // ioredis 5, one command
        note(await io.xadd(stream, "*", "event", text), text);
        break;
      case 1: // ioredis 6, the value as a Buffer, and a field of the service's own
        note(await io6.xadd(stream, "*", "event", Buffer.from(text), "traceId", randomUUID()), text);
        break;
      case 2: { // ioredis 5 pipeline
        const [[error, id]] = await io.pipeline().xadd(stream, "*", "event", text).exec();
        if (error) throw error;
        note(id, text);
        break;
      }
      case 3: // node-redis 4
        note(await nodeRedis.xAdd(stream, "*", { event: text }), text);
        break;
      case 4: { // node-redis 6 transaction
        const [id] = await nodeRedis6.multi().xAdd(stream, "*", { event: text }).exec();
        note(id, text);
        break;
      }
      default: { // node-redis 6, pretty-printed with a trailing newline, as a logger might
        const pretty = JSON.stringify(taskEvent(n, status, step), null, 2) + "\n";
        note(await nodeRedis6.xAdd(stream, "*", { event: pretty }), pretty);
      }
    }
  }
}

// What a service gets wrong, each through one of the clients.
const bad = (n) => taskEvent(10_000 + n, "success", 0);
const refused = [
  [{ ...bad(0), occurredAt: Math.floor(Date.now() / 1000) }, "epoch seconds"],
  [{ ...bad(1), occurredAt: new Date(NaN) }, "occurredAt: null"], // JSON.stringify writes null
  [{ ...bad(2), status: "done" }, "status"],
  [{ ...bad(3), project: undefined }, "project"],
  [{ ...bad(4), blob: "x".repeat(2 * 1024 * 1024) }, "TASK_TRACKING_MAX_EVENT_BYTES"],
];
for (const [data, word] of refused) {
  const text = JSON.stringify(data);
  note(await io.xadd(stream, "*", "event", text), text.slice(0, 200), "invalid", word);
}
const cut = JSON.stringify(bad(5)).slice(0, 60); // a message cut short
note(await nodeRedis.xAdd(stream, "*", { event: cut }), cut, "invalid", "JSON");
note(await nodeRedis.xAdd(stream, "*", { payload: "{}" }), "", "invalid", "no 'event' field");

await io.quit();
await io6.quit();
await nodeRedis.quit();
await nodeRedis6.close();
for (const entry of sent) process.stdout.write(JSON.stringify(entry) + "\n");
