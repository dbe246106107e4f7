// What the access key has spent and has left, under the conversation list (from GET /usage).

import { byId, formatMoney } from "./dom.js";

/** Best effort: the first number found under any of `names`, searched a level deep. */
function pick(object, names) {
  if (!object || typeof object !== "object") return null;
  for (const name of names) {
    const value = object[name];
    if (typeof value === "number" || (typeof value === "string" && value !== "" && !Number.isNaN(Number(value)))) {
      return Number(value);
    }
  }
  for (const value of Object.values(object)) {
    if (value && typeof value === "object" && !Array.isArray(value)) {
      const found = pick(value, names);
      if (found != null) return found;
    }
  }
  return null;
}

/** Show the spend in `usage` (a /usage answer), or nothing for null. */
export function showSpend(usage) {
  const line = byId("spend");
  const budget = usage && typeof usage.budget === "object" ? usage.budget : null;
  const spent = pick(budget, ["spent_usd"]) ?? pick(usage, ["cost_usd", "spend_usd", "spent_usd", "cost", "spent"]);
  const left = pick(budget, ["remaining_usd"]) ?? pick(usage, ["remaining_usd", "budget_remaining_usd", "remaining"]);
  const parts = [];
  if (spent != null && (spent > 0 || left != null)) parts.push(`Spent ${formatMoney(spent)}`);
  if (left != null) parts.push(`${formatMoney(left)} left`);
  line.textContent = parts.join(" · ");
  line.hidden = !parts.length;
}
