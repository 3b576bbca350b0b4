// Event texts as a TypeScript publisher writes them with JSON.stringify (node 20).
const base = (over) => Object.assign({
  eventId: "evt-node-" + over.n, executionId: "exec-node-" + over.n, taskName: "deploy",
  status: "success", project: "my-org/my-repo", occurredAt: "2026-03-15T10:00:00.000Z",
}, over.fields);
const cases = [];
const add = (name, text, verdict) => cases.push({name, text, verdict});
let n = 0;
const name = "Zoë 🚀 deploy";
add("lone high surrogate from slice()", JSON.stringify(base({n: ++n, fields: {actor: {provider: "slack", id: "U1", displayName: name.slice(0, 5)}}})), "valid");
add("lone low surrogate from slice()", JSON.stringify(base({n: ++n, fields: {note: name.slice(5)}})), "valid");
add("lone surrogate in taskName", JSON.stringify(base({n: ++n, fields: {taskName: "build " + "🚀".slice(0, 1)}})), "valid");
add("lone surrogate in executionId", JSON.stringify(base({n: ++n, fields: {executionId: "x" + "🚀".slice(0, 1)}})), "invalid");
add("trailing newline", JSON.stringify(base({n: ++n, fields: {}})) + "\n", "valid");
add("trailing CRLF", JSON.stringify(base({n: ++n, fields: {}})) + "\r\n", "valid");
add("pretty-printed", JSON.stringify(base({n: ++n, fields: {prLinks: ["https://github.com/my-org/my-repo/pull/1"]}}), null, 2), "valid");
add("pretty-printed with tabs", JSON.stringify(base({n: ++n, fields: {visibility: {responsibleUsers: ["a", "b"]}}}), null, "\t"), "valid");
add("upper-case URL scheme", JSON.stringify(base({n: ++n, fields: {prLinks: ["HTTPS://GitHub.com/my-org/my-repo/pull/2"]}})), "valid");
add("numeric GitHub actor id", JSON.stringify(base({n: ++n, fields: {actor: {provider: "github", id: 583231, login: "octocat"}}})), "valid");
add("lower-case t and z", JSON.stringify(base({n: ++n, fields: {occurredAt: "2026-03-15t10:00:00.000z"}})), "valid");
add("Date.now() milliseconds", JSON.stringify(base({n: ++n, fields: {occurredAt: 1773568800000}})), "valid");
add("non-ASCII names", JSON.stringify(base({n: ++n, fields: {taskName: "デプロイ", flow: "リリース"}})), "valid");
add("unknown extra fields", JSON.stringify(base({n: ++n, fields: {attempt: 2, meta: {retries: [1, 2], ok: true, none: null}}})), "valid");
add("malformed optional fields", JSON.stringify(base({n: ++n, fields: {actor: "octocat", prLinks: "https://x", visibility: [], flow: 7}})), "valid");
add("epoch seconds", JSON.stringify(base({n: ++n, fields: {occurredAt: Math.floor(1773568800000 / 1000)}})), "invalid");
add("far future", JSON.stringify(base({n: ++n, fields: {occurredAt: "9999-12-31T23:59:59Z"}})), "invalid");
add("no timezone", JSON.stringify(base({n: ++n, fields: {occurredAt: "2026-03-15T10:00:00"}})), "invalid");
add("newline in executionId", JSON.stringify(base({n: ++n, fields: {executionId: "a\nb"}})), "invalid");
add("NUL in eventId", JSON.stringify(base({n: ++n, fields: {eventId: "a\u0000b"}})), "invalid");
add("asterisk in executionId", JSON.stringify(base({n: ++n, fields: {executionId: "a*b"}})), "valid");
add("executionId of 1 kB", JSON.stringify(base({n: ++n, fields: {executionId: "x".repeat(1000)}})), "invalid");
for (const c of cases) { JSON.parse(c.text); }  // JSON.parse accepts every one of them
process.stdout.write(JSON.stringify({generator: "node " + process.version + " JSON.stringify", cases}, null, 1) + "\n");
