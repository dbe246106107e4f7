// The Vercel AI SDK's openai(model) — the Responses API — against RESPONSES_BASE_URL.
// Usage: node run.mjs generate|stream|tool|stream-tool; prints one JSON object.
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, stepCountIs, streamText, tool } from "ai";
import { z } from "zod";

const openai = createOpenAI({
  baseURL: process.env.RESPONSES_BASE_URL,
  apiKey: process.env.RESPONSES_API_KEY,
});
const model = openai(process.env.RESPONSES_MODEL ?? "gpt-4o-mini");
const calls = [];
const tools = {
  get_weather: tool({
    description: "The weather in a city.",
    inputSchema: z.object({ city: z.string() }),
    execute: async ({ city }) => {
      calls.push({ city });
      return `sunny in ${city}`;
    },
  }),
};
const prompt = "What is the weather in Paris?";
const mode = process.argv[2];
let result;
if (mode === "generate") {
  const answer = await generateText({ model, prompt: "Say hello" });
  result = { text: answer.text, usage: answer.usage, finishReason: answer.finishReason };
} else if (mode === "stream") {
  const answer = streamText({ model, prompt: "Say hello" });
  const deltas = [];
  for await (const delta of answer.textStream) deltas.push(delta);
  result = { deltas, text: await answer.text, usage: await answer.usage };
} else if (mode === "tool") {
  const answer = await generateText({ model, prompt, tools, stopWhen: stepCountIs(3) });
  result = { text: answer.text, calls, steps: answer.steps.length };
} else if (mode === "stream-tool") {
  const answer = streamText({ model, prompt, tools, stopWhen: stepCountIs(3) });
  const deltas = [];
  for await (const delta of answer.textStream) deltas.push(delta);
  result = { text: deltas.join(""), calls, steps: (await answer.steps).length };
} else {
  throw new Error(`unknown mode ${mode}`);
}
process.stdout.write(JSON.stringify(result) + "\n");
