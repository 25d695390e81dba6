// Read one sluice collection stream from Redis and resume after a restart (Node 18+).
//
//   npm install redis
//   node consume.mjs --stream sluice:c:app.bsky.feed.like --cursor-file like.cursor
//
// Each entry's id is its cursor: the id of the last entry handled is saved to a file after
// every batch, and the next run reads after it, so restarts of this script, sluice or
// Redis lose nothing and repeat nothing. Count by the event's `time_us` (source time),
// never by the clock. Writes one line per event: `<entry id> <event JSON>`.
import { createClient } from "redis";
import { readFileSync, writeFileSync, renameSync } from "node:fs";
import { parseArgs } from "node:util";

const { values: args } = parseArgs({
  options: {
    url: { type: "string", default: "redis://127.0.0.1:6379/0" },
    stream: { type: "string", default: "sluice:c:app.bsky.feed.like" },
    "cursor-file": { type: "string", default: "sluice.cursor" },
    start: { type: "string", default: "0-0" },
    max: { type: "string", default: "0" }, // stop after this many events (0 = never)
    "idle-exit": { type: "string", default: "0" }, // stop after this many idle seconds
  },
});

function loadCursor() {
  try {
    return readFileSync(args["cursor-file"], "utf8").trim() || args.start;
  } catch {
    return args.start;
  }
}

function saveCursor(id) {
  // Write then rename: a crash leaves the old cursor or the new one.
  const tmp = args["cursor-file"] + ".tmp";
  writeFileSync(tmp, id);
  renameSync(tmp, args["cursor-file"]);
}

const client = createClient({ url: args.url });
client.on("error", (e) => console.error(`redis: ${e.message}`)); // it reconnects itself
await client.connect();

let cursor = loadCursor();
let idleSince = Date.now();
let seen = 0;
const max = Number(args.max);
const idleExitMs = Number(args["idle-exit"]) * 1000;
for (;;) {
  let reply;
  try {
    const count = max > 0 ? Math.min(500, max - seen) : 500;
    reply = await client.xRead({ key: args.stream, id: cursor }, { COUNT: count, BLOCK: 1000 });
  } catch (e) {
    console.error(`read failed (${e.message}); retrying`);
    await new Promise((r) => setTimeout(r, 500));
    continue;
  }
  const entries = reply ? reply[0].messages : [];
  for (const { id, message } of entries) {
    const event = JSON.parse(message.event); // also: message.time_us, message.seq, message.did
    process.stdout.write(`${id} ${JSON.stringify(event)}\n`);
    cursor = id;
    seen += 1;
  }
  if (entries.length > 0) {
    saveCursor(cursor);
    idleSince = Date.now();
  }
  if (max > 0 && seen >= max) break;
  if (idleExitMs > 0 && Date.now() - idleSince > idleExitMs) break;
}
await client.quit();
