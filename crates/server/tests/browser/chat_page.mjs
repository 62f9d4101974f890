// The chat page in a real browser, against the real server: two greedy turns whose replies must
// equal the engine's (the second continues the conversation), regenerate, edit-and-resend,
// log-probabilities, conversations that survive a reload (rename, delete, export, import), and a
// long sampled reply stopped with Esc. Replies the random-weight model cannot be made to write
// (HTML, script, a javascript: link, a code block) and an API key come from `page.route`.
//
// usage: node chat_page.mjs BASE_URL EXPECTED_JSON
//   CHROMIUM: the browser binary; VICUNA_SCREENSHOTS: a folder for the 1280×800 and 390×844
//   screenshots in light and dark (none are taken without it); VICUNA_SCREENSHOTS_ONLY=1: only those.

import fs from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";

const [baseUrl, expectedJson] = process.argv.slice(2);
const expected = JSON.parse(expectedJson);

function check(name, ok, detail) {
  if (!ok) {
    console.log(`FAIL ${name}: ${detail}`);
    process.exit(1);
  }
  console.log(`ok   ${name}`);
}

// An OpenAI chat stream of these text pieces (each with optional log-probabilities), then usage.
function sse(pieces) {
  const chunk = (choices, extra) => `data: ${JSON.stringify({ id: "chatcmpl-test", object: "chat.completion.chunk", choices, ...extra })}\n\n`;
  let body = chunk([{ index: 0, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null }]);
  for (const piece of pieces) {
    const [text, logprobs] = Array.isArray(piece) ? piece : [piece, null];
    body += chunk([{ index: 0, delta: { content: text }, logprobs, finish_reason: null }]);
  }
  body += chunk([{ index: 0, delta: {}, logprobs: null, finish_reason: "stop" }]);
  body += chunk([], { usage: { prompt_tokens: 20, completion_tokens: pieces.length, total_tokens: 20 + pieces.length } });
  return body + "data: [DONE]\n\n";
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});

async function newPage(options = {}) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, ...options });
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: baseUrl });
  const page = await context.newPage();
  page.errors = [];
  page.on("pageerror", (error) => page.errors.push(String(error)));
  page.chatRequests = [];
  page.on("request", (request) => {
    if (request.url().endsWith("/v1/chat/completions")) page.chatRequests.push(request);
  });
  return page;
}

const idle = (page) => page.locator("#send").waitFor({ state: "visible", timeout: 30000 });
const stored = (page) => page.evaluate(() => JSON.parse(localStorage.getItem("vicuna-chats")));
const lastBody = (page) => JSON.parse(page.chatRequests[page.chatRequests.length - 1].postData());

async function settings(page, values) {
  await page.click("#settings-button");
  for (const [id, value] of Object.entries(values)) {
    if (typeof value === "boolean") await page.setChecked("#" + id, value);
    else await page.fill("#" + id, String(value));
  }
  await page.click("#settings-close");
}

async function say(page, text) {
  await page.fill("#input", text);
  await page.press("#input", "Enter");
  await idle(page);
}

try {
  if (process.env.VICUNA_SCREENSHOTS_ONLY) {
    await screenshots(process.env.VICUNA_SCREENSHOTS);
    process.exit(0);
  }
  const page = await newPage();
  await page.goto(baseUrl + "/");
  check("page title", (await page.title()) === "vicuna chat", await page.title());
  await page.waitForFunction(() => document.getElementById("model").textContent.includes(" ctx"));
  const model = await page.textContent("#model");
  check("model and context from /info", model === `${expected.model_id} · ${expected.max_total_tokens} ctx`, model);

  // Two greedy turns: what the page keeps and sends equals the engine's replies.
  await settings(page, { temperature: 0, max_tokens: expected.max_tokens });
  const turns = expected.turns;
  for (const [i, turn] of turns.entries()) {
    await say(page, turn.user);
    const kept = (await stored(page))[0].messages;
    check(`turn ${i + 1} reply`, kept.length === 2 * (i + 1) && kept[2 * i + 1].content === turn.reply,
      `kept ${JSON.stringify(kept[2 * i + 1])}, want ${JSON.stringify(turn.reply)}`);
    const shown = await page.locator(".message.assistant .content").nth(i).textContent();
    check(`turn ${i + 1} shown`, shown.replace(/\s+/g, "").length > 0 || turn.reply.trim() === "", JSON.stringify(shown));
    const sent = lastBody(page);
    check(`turn ${i + 1} request`, sent.stream === true && sent.stream_options.include_usage === true
      && sent.temperature === 0 && sent.max_tokens === expected.max_tokens && !("response_format" in sent) && !sent.logprobs,
      JSON.stringify(sent));
    const history = turns.slice(0, i).flatMap((t) => [{ role: "user", content: t.user }, { role: "assistant", content: t.reply }]);
    check(`turn ${i + 1} carries the conversation`,
      JSON.stringify(sent.messages) === JSON.stringify([...history, { role: "user", content: turn.user }]), JSON.stringify(sent.messages));
  }
  const stats = await page.locator(".message.assistant .stats").nth(1).textContent();
  check("speed and first-token time under the reply", /tokens? · [\d.]+ tok\/s · [\d.]+ s to first token · context \d+ \/ \d+/.test(stats), stats);

  // Regenerate replaces the last reply (greedy, so with the same text) and sends the turn again.
  const sentBefore = page.chatRequests.length;
  await page.locator(".message.assistant .regenerate").click();
  await idle(page);
  let kept = (await stored(page))[0].messages;
  check("regenerate replaces the last reply", page.chatRequests.length === sentBefore + 1
    && (await page.locator(".message.assistant").count()) === 2 && kept.length === 4 && kept[3].content === turns[1].reply,
    JSON.stringify(kept));
  check("regenerate sends the conversation without the old reply",
    JSON.stringify(lastBody(page).messages.map((m) => m.role)) === '["user","assistant","user"]', JSON.stringify(lastBody(page).messages));

  // Edit the last user message and send it again: the turn is replaced, not added.
  await page.locator(".message.user").nth(1).hover();
  await page.locator(".message.user .edit").click();
  await page.fill(".edit-box textarea", "And a vicuña?");
  await page.click(".send-edit");
  await idle(page);
  kept = (await stored(page))[0].messages;
  check("edit and resend", kept.length === 4 && kept[2].content === "And a vicuña?"
    && lastBody(page).messages[2].content === "And a vicuña?" && (await page.locator(".message.user").count()) === 2,
    JSON.stringify(kept));

  // Text the user types that looks like markup is shown as text.
  const markup = '<img src=x onerror="window.injected=1"><b>bold</b>';
  await settings(page, { max_tokens: 2 });
  await say(page, markup);
  const userBubble = page.locator(".message.user .content").nth(2);
  check("user markup shown as text", (await userBubble.textContent()) === markup, await userBubble.innerHTML());

  // A reply with HTML, script and a javascript: link (canned, as the model will not write it),
  // sent with a JSON schema so the request's response_format can be checked too.
  const code = "const answer = 42; // the answer\nconsole.log(`<b>${answer}</b>`);";
  const nasty = [
    "# Safe heading\n\n", "<script>window.injected = 2</script>\n\n", '<img src=x onerror="window.injected = 3">\n\n',
    "[click me](javascript:window.injected=4) and [docs](https://example.com/docs) or <javascript:alert(1)>\n\n",
    "- one **bold**\n  - nested `code`\n- two\n\n", "| name | value |\n|---|--:|\n| a | 1 |\n\n", "```js\n" + code + "\n```\n",
  ];
  const schema = { type: "object", properties: { answer: { type: "string" } } };
  await settings(page, { json_schema: JSON.stringify(schema) });
  await page.route("**/v1/chat/completions", (route) => route.fulfill({ status: 200, contentType: "text/event-stream", body: sse(nasty) }));
  await say(page, "Show me something dangerous.");
  await page.unroute("**/v1/chat/completions");
  const format = lastBody(page).response_format;
  check("JSON schema sent as response_format", JSON.stringify(format) === JSON.stringify({ type: "json_schema", json_schema: { name: "schema", schema } }),
    JSON.stringify(format));
  await settings(page, { json_schema: "" });
  const reply = page.locator(".message.assistant .content").last();
  const replyText = await reply.textContent();
  check("no script ran", (await page.evaluate(() => window.injected)) === undefined, "window.injected set");
  check("no element made from reply HTML", (await page.locator(".thread script, .thread img, .thread b").count()) === 0, await reply.innerHTML());
  check("reply HTML shown as text", replyText.includes("<script>window.injected = 2</script>") && replyText.includes("<img src=x"), replyText);
  const links = await reply.locator("a").evaluateAll((as) => as.map((a) => a.href));
  check("only the https link is a link", JSON.stringify(links) === '["https://example.com/docs"]', JSON.stringify(links));
  check("javascript: link shown as text", replyText.includes("[click me](javascript:window.injected=4)"), replyText);
  check("markdown rendered", await reply.locator("h1").textContent() === "Safe heading"
    && (await reply.locator("ul ul code").textContent()) === "code" && (await reply.locator("strong").textContent()) === "bold"
    && (await reply.locator("th").count()) === 2 && (await reply.locator("td").nth(1).evaluate((td) => td.style.textAlign)) === "right"
    && (await reply.locator(".tok-k").count()) > 0, await reply.innerHTML());
  await reply.locator(".code-block .copy").click();
  const copied = await page.evaluate(() => navigator.clipboard.readText());
  check("code block copy button copies its text", copied === code, JSON.stringify(copied));
  await page.locator(".message.assistant .copy-message").last().click();
  const copiedReply = await page.evaluate(() => navigator.clipboard.readText());
  check("copy button copies the reply", copiedReply === nasty.join(""), JSON.stringify(copiedReply));

  // Log-probabilities from the real server, shown as shaded tokens with the alternatives.
  await settings(page, { logprobs: true, top_logprobs: 3, max_tokens: 4, temperature: 0 });
  await say(page, "Hi");
  const sent = lastBody(page);
  check("logprobs requested", sent.logprobs === true && sent.top_logprobs === 3, JSON.stringify(sent));
  await page.locator(".message.assistant .probs").last().click();
  const tokens = page.locator(".message.assistant").last().locator(".token");
  const title = await tokens.first().getAttribute("title");
  check("tokens shaded by probability", (await tokens.count()) >= 1 && /%/.test(title) && title.split("\n").length === 4, title);
  await settings(page, { logprobs: false });

  // Conversations survive a reload; rename, switch and delete.
  await page.click("#new-chat");
  await say(page, "A second conversation");
  check("new chat listed", (await page.locator("#chats li").count()) === 2, String(await page.locator("#chats li").count()));
  await page.locator("#chats li").nth(1).hover(); // the row's buttons show on hover
  await page.locator("#chats li").nth(1).locator(".rename").click();
  await page.fill("#chats input", "Llamas");
  await page.press("#chats input", "Enter");
  await page.reload();
  await page.waitForFunction(() => document.getElementById("model").textContent.includes(" ctx"));
  const names = await page.locator("#chats .open").allTextContents();
  check("reload keeps the conversation list", JSON.stringify(names) === JSON.stringify(["A second conversation", "Llamas"]), JSON.stringify(names));
  await page.locator("#chats .open").nth(1).click();
  check("switching shows the conversation", (await page.locator(".message.user").count()) === 5
    && (await page.textContent("#title")) === "Llamas", String(await page.locator(".message.user").count()));

  // Export, then import into a browser that has never seen the page.
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#export")]);
  const exported = JSON.parse(fs.readFileSync(await download.path(), "utf8"));
  check("export", exported.conversations.length === 2, JSON.stringify(exported).slice(0, 200));
  const fresh = await newPage();
  await fresh.goto(baseUrl + "/");
  await fresh.setInputFiles("#import-file", { name: "chats.json", mimeType: "application/json", buffer: Buffer.from(JSON.stringify(exported)) });
  await fresh.locator("#chats li").nth(1).waitFor();
  check("import", (await fresh.locator("#chats .open").allTextContents()).join() === names.join(), "");
  await fresh.context().close();

  page.once("dialog", (dialog) => dialog.accept());
  await page.locator("#chats li").nth(0).hover();
  await page.locator("#chats li").nth(0).locator(".delete").click();
  check("delete", (await page.locator("#chats li").count()) === 1, "");

  // A long sampled reply: the text grows while it streams, and Esc stops it.
  await settings(page, { temperature: 1, max_tokens: 1500 });
  await page.fill("#input", "Tell me a long story.");
  await page.press("#input", "Enter");
  const streaming = page.locator(".message.assistant.streaming .content");
  await page.waitForFunction(() => (document.querySelector(".message.assistant.streaming .content") || {}).textContent?.length > 0,
    null, { timeout: 30000 });
  const before = (await streaming.textContent()).length;
  await page.waitForFunction((n) => document.querySelector(".message.assistant.streaming .content").textContent.length > n,
    before, { timeout: 30000 });
  check("reply streams in", (await streaming.textContent()).length > before, "did not grow");
  check("stop shown while streaming", await page.isVisible("#stop") && !(await page.isVisible("#send")), "");
  await page.keyboard.press("Escape");
  await idle(page);
  const stopped = page.locator(".message.assistant").last();
  const stoppedAt = (await stopped.locator(".content").textContent()).length;
  await page.waitForTimeout(300);
  check("Esc ends the stream", (await stopped.locator(".content").textContent()).length === stoppedAt
    && (await stopped.locator(".stats").textContent()).includes("stopped") && !(await page.isVisible("#stop")), "still going");
  check("no page errors", page.errors.length === 0, page.errors.join("; "));
  await page.context().close();

  await apiKey();
  if (process.env.VICUNA_SCREENSHOTS) await screenshots(process.env.VICUNA_SCREENSHOTS);
  console.log("chat page ok");
} finally {
  await browser.close();
}

// With --api-key (played here by page.route): the page asks for the key, asks again after a
// 401, sends it as a Bearer token and keeps it for the session.
async function apiKey() {
  const page = await newPage();
  const authorized = (route) => route.request().headers().authorization === "Bearer sesame";
  const refuse = (route) => route.fulfill({ status: 401, contentType: "application/json", body: '{"error":"unauthorized","error_type":"unauthorized"}' });
  await page.route("**/info", (route) => authorized(route)
    ? route.fulfill({ contentType: "application/json", body: JSON.stringify({ model_id: "keyed", max_total_tokens: 4096 }) }) : refuse(route));
  await page.route("**/v1/chat/completions", (route) => authorized(route)
    ? route.fulfill({ contentType: "text/event-stream", body: sse(["Hello", " there."]) }) : refuse(route));
  await page.goto(baseUrl + "/");
  await page.locator("#key-dialog[open]").waitFor();
  await page.fill("#key-input", "wrong");
  await page.click("#key-ok");
  await page.waitForFunction(() => document.getElementById("key-reason").textContent.includes("refused"));
  check("a refused key is asked again", await page.isVisible("#key-dialog"), "");
  await page.fill("#key-input", "sesame");
  await page.click("#key-ok");
  await page.waitForFunction(() => document.getElementById("model").textContent === "keyed · 4096 ctx");
  await say(page, "Hello?");
  const auth = page.chatRequests[page.chatRequests.length - 1].headers().authorization;
  check("chat sends the key", auth === "Bearer sesame" && (await stored(page))[0].messages[1].content === "Hello there.", auth);
  await page.reload();
  await page.waitForFunction(() => document.getElementById("model").textContent === "keyed · 4096 ctx");
  check("key kept for the session", !(await page.isVisible("#key-dialog")), "asked again");
  check("no page errors (API key)", page.errors.length === 0, page.errors.join("; "));
  await page.context().close();
}

// A canned conversation (the test model's replies are random text) at desktop and phone sizes,
// light and dark.
async function screenshots(folder) {
  fs.mkdirSync(folder, { recursive: true });
  const now = Date.now();
  const demo = [
    {
      id: "demo", title: "", system: "", created: now, updated: now, messages: [
        { role: "user", content: "How do I read a file line by line in Python, and how fast is it?" },
        {
          role: "assistant", content: "Iterate over the file object: Python reads it in buffered chunks and yields one line at a time, "
            + "so even a large file never has to fit in memory.\n\n```python\nwith open(\"data.txt\", encoding=\"utf-8\") as f:\n"
            + "    for number, line in enumerate(f, start=1):\n        print(number, line.rstrip())  # strip the newline\n```\n\n"
            + "### Speed\n\n| method | 1 GB file | memory |\n|---|--:|---|\n| `for line in f` | 2.1 s | constant |\n"
            + "| `f.readlines()` | 2.4 s | whole file |\n\n- Pass `encoding=` explicitly; the default depends on the platform.\n"
            + "- For **binary** data open with `\"rb\"` and read fixed-size blocks instead.",
          stats: { tokens: 164, tokensPerSecond: 23.7, firstTokenMs: 182, promptTokens: 41, cachedTokens: 0 }, finish: "stop",
        },
        { role: "user", content: "Thanks! And to count the lines only?" },
        {
          role: "assistant", content: "`sum(1 for _ in f)` counts them without keeping any line. See the [io docs](https://docs.python.org/3/library/io.html) for buffering options.",
          stats: { tokens: 31, tokensPerSecond: 24.1, firstTokenMs: 96, promptTokens: 223, cachedTokens: 205 }, finish: "stop",
        },
      ],
    },
    { id: "b", title: "Trip to Cusco: packing list", system: "", created: now - 9e5, updated: now - 9e5, messages: [] },
    { id: "c", title: "Explain KV-cache paging", system: "", created: now - 9e6, updated: now - 9e6, messages: [] },
    { id: "d", title: "Rust lifetimes, briefly", system: "", created: now - 9e7, updated: now - 9e7, messages: [] },
  ];
  for (const colorScheme of ["light", "dark"]) {
    for (const [name, viewport] of [["desktop", { width: 1280, height: 800 }], ["phone", { width: 390, height: 844 }]]) {
      const page = await newPage({ viewport, colorScheme });
      await page.goto(baseUrl + "/");
      await page.evaluate((chats) => {
        localStorage.setItem("vicuna-chats", JSON.stringify(chats));
        localStorage.setItem("vicuna-current", "demo");
      }, demo);
      await page.reload();
      await page.waitForFunction(() => document.getElementById("model").textContent.includes(" ctx"));
      await page.evaluate(() => { document.getElementById("log").scrollTop = 0; });
      const file = path.join(folder, `chat-${name}-${colorScheme}.png`);
      await page.screenshot({ path: file });
      console.log(`screenshot ${file}`);
      await page.context().close();
    }
  }
}
