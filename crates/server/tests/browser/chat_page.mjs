// The chat page in a real browser: two greedy turns whose replies must equal the engine's (the
// second continues the conversation), model-looking HTML shown as text, and a long sampled reply
// that visibly streams and is cut short by the Stop button.
//
// usage: node chat_page.mjs BASE_URL EXPECTED_JSON   (CHROMIUM: the browser binary)

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

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = await browser.newPage();
  const pageErrors = [];
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  const chatBodies = [];
  page.on("request", (request) => {
    if (request.url().endsWith("/v1/chat/completions")) chatBodies.push(JSON.parse(request.postData()));
  });
  await page.goto(baseUrl + "/");
  check("page title", (await page.title()) === "vicuna chat", await page.title());

  await page.fill("#temperature", "0");
  await page.fill("#max_tokens", String(expected.max_tokens));
  const assistant = (i) => page.locator(".message.assistant").nth(i);
  for (const [i, turn] of expected.turns.entries()) {
    await page.fill("#input", turn.user);
    await page.press("#input", "Enter");
    await page.locator(`.message.assistant[data-done="true"]`).nth(i).waitFor({ timeout: 30000 });
    const shown = await assistant(i).textContent();
    check(`turn ${i + 1} reply`, shown === turn.reply, `shown ${JSON.stringify(shown)}, want ${JSON.stringify(turn.reply)}`);
    const sent = chatBodies[i];
    check(`turn ${i + 1} request`, sent.stream === true && sent.temperature === 0 && sent.max_tokens === expected.max_tokens,
      JSON.stringify(sent));
    const history = expected.turns.slice(0, i).flatMap((t) => [
      { role: "user", content: t.user }, { role: "assistant", content: t.reply },
    ]);
    const want = [...history, { role: "user", content: turn.user }];
    check(`turn ${i + 1} carries the conversation`, JSON.stringify(sent.messages) === JSON.stringify(want),
      JSON.stringify(sent.messages));
  }

  // Text that looks like markup is shown as text, never parsed.
  const markup = '<img src=x onerror="window.injected=1"><b>bold</b>';
  await page.fill("#max_tokens", "2");
  await page.fill("#input", markup);
  await page.press("#input", "Enter");
  await page.locator(`.message.assistant[data-done="true"]`).nth(2).waitFor({ timeout: 30000 });
  const userBubble = page.locator(".message.user").nth(2);
  check("markup shown as text", (await userBubble.textContent()) === markup, await userBubble.innerHTML());
  check("no element created from text", (await page.locator(".message img, .message b").count()) === 0, "found elements");
  check("no script ran", (await page.evaluate(() => window.injected)) === undefined, "window.injected set");

  // A long sampled reply: the text grows while it streams, and Stop ends it.
  await page.fill("#temperature", "1");
  await page.fill("#max_tokens", "1500");
  await page.fill("#input", "Tell me a long story.");
  await page.press("#input", "Enter");
  const streaming = page.locator(".message.assistant").nth(3);
  await page.waitForFunction(() => {
    const bubbles = document.querySelectorAll(".message.assistant");
    return bubbles.length === 4 && bubbles[3].textContent.length > 0;
  }, null, { timeout: 30000 });
  const before = (await streaming.textContent()).length;
  await page.waitForFunction((n) => document.querySelectorAll(".message.assistant")[3].textContent.length > n,
    before, { timeout: 30000 });
  const after = (await streaming.textContent()).length;
  check("reply streams in", after > before && (await streaming.getAttribute("class")).includes("streaming"),
    `${before} → ${after} characters`);
  check("stop enabled while streaming", await page.isEnabled("#stop"), "disabled");
  await page.click("#stop");
  await page.locator(`.message.assistant[data-done="true"]`).nth(3).waitFor({ timeout: 10000 });
  const stoppedAt = (await streaming.textContent()).length;
  await page.waitForTimeout(300);
  check("stop ends the stream", (await streaming.textContent()).length === stoppedAt
    && !(await streaming.getAttribute("class")).includes("streaming") && !(await page.isEnabled("#stop")), "still going");
  check("no page errors", pageErrors.length === 0, pageErrors.join("; "));
  await page.screenshot({ path: process.env.SCREENSHOT || "/tmp/vicuna-chat-page.png" });
  console.log("chat page ok");
} finally {
  await browser.close();
}
