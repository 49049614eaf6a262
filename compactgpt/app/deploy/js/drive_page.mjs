// Opens a CompactGPT web page in headless Chromium and prints what it generated as one JSON line:
//   node drive_page.mjs NODE_MODULES CHROMIUM URL TIMEOUT_SECONDS
// It waits until document.title is "done" or starts with "error", then prints
// {title, output, state} where state is the page's window.compactgpt. Page console errors go to stderr.
import { createRequire } from "node:module";

const [modules, chromium, url, timeoutSeconds] = process.argv.slice(2);
const puppeteer = createRequire(`${modules}/`)("puppeteer-core");

const browser = await puppeteer.launch({
  executablePath: chromium,
  headless: true,
  // No sandbox: CI containers run as root, where Chromium's sandbox cannot start.
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--enable-unsafe-webgpu"],
});
try {
  const page = await browser.newPage();
  page.on("console", (m) => { if (m.type() === "error") console.error(`[page] ${m.text()}`); });
  page.on("pageerror", (e) => console.error(`[page] ${e.message}`));
  await page.goto(url, { waitUntil: "load" });
  await page.waitForFunction(() => document.title === "done" || document.title.startsWith("error"),
                             { timeout: Number(timeoutSeconds) * 1000, polling: 100 });
  const result = await page.evaluate(() => ({
    title: document.title,
    output: document.getElementById("output").textContent,
    state: window.compactgpt,
  }));
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
