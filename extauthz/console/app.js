// The extauthz web console: plain JavaScript, no build step, no library.
//
// It calls the admin REST API (/api/..., Envoy's grpc_json_transcoder in front of the
// server's gRPC services) on the page's own origin, with the admin token as a bearer
// header. The token lives in this tab's sessionStorage and nowhere else: never in a URL,
// a cookie or localStorage. Every view builds its DOM with createElement and textContent
// (no innerHTML), so nothing the API returns is ever parsed as markup.
"use strict";

(() => {
  const TOKEN_KEY = "extauthz.admin-token";
  const HEALTH_EVERY_MS = 15000;
  const USAGE_DAYS = 30;
  const SVG_NS = "http://www.w3.org/2000/svg";
  // a key's numeric limits, as both the create form and the limits form read them:
  // [field, label, whole number]
  const LIMIT_NUMBERS = [
    ["max_budget", "Max budget", false],
    ["rpm_limit", "Requests per minute", true],
    ["tpm_limit", "Tokens per minute", true],
    ["max_parallel_requests", "Requests in flight", true],
  ];
  const GRPC_CODES = [
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
  ];
  // What a failed call means, by HTTP status, in front of the server's own words.
  const LEADS = {
    400: "The server did not accept the request",
    401: "The admin token was not accepted",
    403: "Not allowed",
    404: "Not found",
    409: "Conflict",
    413: "Too large",
    429: "Too many requests",
    500: "The server failed",
    502: "Envoy got no good answer from the server",
    503: "The server is unavailable",
    504: "The server took too long to answer",
  };

  const main = document.getElementById("main");
  const nav = document.getElementById("nav");
  const signOutButton = document.getElementById("sign-out");
  let generation = 0; // bumped on every navigation; a view that loaded late draws nothing
  let flash = null; // a message for the next view (after a delete, a sign-in)

  // ------------------------------------------------------------------ DOM helpers

  function h(tag, attrs, ...children) {
    return build(document.createElement(tag), attrs, children);
  }

  function s(tag, attrs, ...children) {
    return build(document.createElementNS(SVG_NS, tag), attrs, children);
  }

  function build(node, attrs, children) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on") && typeof value === "function") {
        node.addEventListener(name.slice(2), value);
      } else if (name === "value" || name === "checked") {
        node[name] = value;
      } else {
        node.setAttribute(name === "className" ? "class" : name, value === true ? "" : value);
      }
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  let uid = 0;
  function nextId(prefix) {
    uid += 1;
    return `${prefix}-${uid}`;
  }

  // A labelled form control with an optional hint (its accessible description).
  function field(label, control, hint) {
    const id = control.id || nextId("f");
    control.id = id;
    let hintNode = null;
    if (hint) {
      hintNode = h("span", { className: "hint", id: `${id}-hint` }, hint);
      control.setAttribute("aria-describedby", hintNode.id);
    }
    return h("div", { className: "field" }, h("label", { for: id }, label), control, hintNode);
  }

  function checkbox(label, control, hint) {
    const id = control.id || nextId("f");
    control.id = id;
    control.type = "checkbox";
    let hintNode = null;
    if (hint) {
      hintNode = h("span", { className: "hint", id: `${id}-hint` }, hint);
      control.setAttribute("aria-describedby", hintNode.id);
    }
    return h(
      "div",
      { className: "field check" },
      h("span", { className: "check-row" }, control, h("label", { for: id }, label)),
      hintNode,
    );
  }

  function button(label, onclick, className, type) {
    return h("button", { type: type || "button", className: className || null, onclick }, label);
  }

  // ------------------------------------------------------------------ formatting

  function usd(value) {
    const v = Number(value) || 0;
    const digits = v !== 0 && Math.abs(v) < 1 ? 6 : 4;
    return new Intl.NumberFormat("en-US", {
      style: "currency",
      currency: "USD",
      minimumFractionDigits: 2,
      maximumFractionDigits: digits,
    }).format(v);
  }

  function count(value) {
    return new Intl.NumberFormat("en-US").format(Number(value) || 0);
  }

  function when(timestamp) {
    if (!timestamp) return "never";
    const date = new Date(timestamp);
    if (Number.isNaN(date.getTime())) return String(timestamp);
    return `${date.toISOString().slice(0, 16).replace("T", " ")} UTC`;
  }

  function limit(value) {
    const n = Number(value) || 0;
    return n === 0 ? "no limit" : count(n);
  }

  function inFlight(data) {
    const most = Number(data.max_parallel_requests) || 0;
    return `${count(data.in_flight)} now, ${most ? `at most ${count(most)}` : "no limit"}`;
  }

  // The limits that are set, in words ("none" when none is).
  function limits(data) {
    const set = [
      [data.rpm_limit, "requests/min"],
      [data.tpm_limit, "tokens/min"],
      [data.max_parallel_requests, "in flight"],
    ].filter(([value]) => Number(value) > 0);
    return set.length ? set.map(([value, unit]) => `${count(value)} ${unit}`).join(", ") : "none";
  }

  function models(list) {
    if (!list || list.length === 0 || (list.length === 1 && list[0] === "*")) return "every model";
    return list.join(", ");
  }

  // ------------------------------------------------------------------ the API

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  class FormError extends Error {}

  const session = {
    token: () => sessionStorage.getItem(TOKEN_KEY),
    keep: (token) => sessionStorage.setItem(TOKEN_KEY, token),
    forget: () => sessionStorage.removeItem(TOKEN_KEY),
  };

  // <main> is aria-busy while any API call is out (assistive technology waits; so can tests).
  let pending = 0;
  function loading(change) {
    pending += change;
    main.setAttribute("aria-busy", pending > 0 ? "true" : "false");
  }

  // A read that found the server briefly unable to reach Redis (503, UNAVAILABLE) is asked
  // once more, 0.3 s later; a write never is: the operator sees the error and decides.
  async function api(method, path, body, token) {
    loading(1);
    try {
      try {
        return await call(method, path, body, token);
      } catch (err) {
        if (method !== "GET" || !(err instanceof ApiError) || err.status !== 503) throw err;
        await new Promise((resolve) => setTimeout(resolve, 300));
        return await call(method, path, body, token);
      }
    } finally {
      loading(-1);
    }
  }

  async function call(method, path, body, token) {
    const headers = { accept: "application/json" };
    const bearer = token || session.token();
    if (bearer) headers.authorization = `Bearer ${bearer}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    let reply;
    try {
      reply = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: "omit",
        cache: "no-store",
        redirect: "error",
        referrerPolicy: "no-referrer",
      });
    } catch (err) {
      throw new ApiError(0, null, "no answer from the server (network error)");
    }
    const text = await reply.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : {};
    } catch (err) {
      data = null;
    }
    if (!reply.ok) {
      if (data && typeof data.message === "string" && data.message) {
        throw new ApiError(reply.status, data.code, data.message);
      }
      const said = text.trim().slice(0, 300) || reply.statusText || "no reason given";
      throw new ApiError(reply.status, null, said);
    }
    if (data === null) throw new ApiError(reply.status, null, "the answer was not JSON");
    return data;
  }

  function q(params) {
    const query = new URLSearchParams();
    for (const [name, value] of Object.entries(params)) {
      if (value !== undefined && value !== null && value !== "") query.set(name, String(value));
    }
    const text = query.toString();
    return text ? `?${text}` : "";
  }

  const seg = encodeURIComponent;

  // An error, in words: what failed, the server's own message, the HTTP status and code.
  function describe(err) {
    if (err instanceof FormError) return err.message;
    if (err instanceof ApiError) {
      if (err.status === 0) {
        return `Could not reach the server: ${err.message}. Check that Envoy and extauthz are running.`;
      }
      const name = typeof err.code === "number" ? GRPC_CODES[err.code] : null;
      const lead = LEADS[err.status] || `The request failed`;
      return `${lead}: ${err.message} (HTTP ${err.status}${name ? `, ${name}` : ""}).`;
    }
    return `Something went wrong in the console: ${err && err.message ? err.message : err}`;
  }

  // ------------------------------------------------------------------ views

  // A new page in <main>: its heading (focused, so screen readers and the keyboard start
  // there), an alert region for errors and a status region for what just happened.
  function startView(title, options) {
    generation += 1;
    const mine = generation;
    document.title = `${title} · extauthz console`;
    main.replaceChildren();
    const heading = h("h1", { tabindex: "-1" }, title);
    const alert = h("div", { className: "error", role: "alert", hidden: true });
    const status = h("div", { className: "notice", role: "status" });
    main.append(heading, alert, status);
    const view = {
      heading,
      alive: () => mine === generation,
      error(err) {
        alert.textContent = describe(err);
        alert.hidden = false;
        if (err instanceof ApiError && err.status === 401 && session.token()) {
          alert.append(" ", button("Sign in again", signOut, "link"));
        }
      },
      clear() {
        alert.textContent = "";
        alert.hidden = true;
        status.textContent = "";
      },
      say(text) {
        status.textContent = text;
      },
      append(...nodes) {
        main.append(...nodes);
      },
    };
    if (flash) {
      view.say(flash);
      flash = null;
    }
    if (!options || options.focus !== false) heading.focus();
    return view;
  }

  // Runs a call for a form or button: disables it meanwhile, and shows what failed.
  async function busy(view, control, work) {
    view.clear();
    control.disabled = true;
    control.setAttribute("aria-busy", "true");
    try {
      return await work();
    } catch (err) {
      if (view.alive()) view.error(err);
      return undefined;
    } finally {
      control.disabled = false;
      control.removeAttribute("aria-busy");
    }
  }

  const dialog = document.getElementById("confirm");

  function confirmAction(title, text, action) {
    document.getElementById("confirm-title").textContent = title;
    document.getElementById("confirm-text").textContent = text;
    document.getElementById("confirm-ok").textContent = action;
    const opener = document.activeElement;
    return new Promise((resolve) => {
      const ok = document.getElementById("confirm-ok");
      const cancel = document.getElementById("confirm-cancel");
      const finish = (answer) => {
        ok.removeEventListener("click", yes);
        cancel.removeEventListener("click", no);
        dialog.removeEventListener("close", no);
        if (dialog.open) dialog.close();
        if (opener && opener.focus) opener.focus();
        resolve(answer);
      };
      const yes = () => finish(true);
      const no = () => finish(false);
      ok.addEventListener("click", yes);
      cancel.addEventListener("click", no);
      dialog.addEventListener("close", no); // Escape
      dialog.showModal();
      cancel.focus();
    });
  }

  // A secret shown once, with a copy button.
  function secretPanel(title, key, note) {
    const status = h("p", { className: "copied", role: "status" });
    const input = h("input", {
      type: "text",
      readonly: true,
      value: key,
      id: "new-secret",
      className: "secret",
      spellcheck: "false",
      autocomplete: "off",
    });
    const copy = button("Copy", async () => {
      status.textContent = (await copyText(key, input))
        ? "Copied to the clipboard."
        : "Could not copy: select the key and press Ctrl+C (⌘C).";
    });
    copy.id = "copy-secret";
    return h(
      "section",
      { className: "panel secret-panel", "aria-labelledby": "secret-title" },
      h("h2", { id: "secret-title" }, title),
      h("p", {}, note),
      h(
        "div",
        { className: "secret-row" },
        h("label", { for: "new-secret", className: "visually-hidden" }, "The key"),
        input,
        copy,
      ),
      status,
    );
  }

  async function copyText(text, input) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (err) {
      input.focus();
      input.select();
      try {
        return document.execCommand("copy");
      } catch (err2) {
        return false;
      }
    }
  }

  // ------------------------------------------------------------------ charts (inline SVG)

  // spent / reserved / remaining of a budget, as one bar and its words.
  function budgetBar(data) {
    const max = Number(data.max_budget) || 0;
    const spent = Number(data.spent) || 0;
    const reserved = Number(data.reserved) || 0;
    const remaining =
      data.budget_remaining === undefined || data.budget_remaining === null
        ? Math.max(0, max - spent - reserved)
        : Number(data.budget_remaining);
    let words;
    if (max === 0) {
      words = `No budget: ${usd(spent)} spent, ${usd(reserved)} reserved, not limited.`;
    } else {
      words =
        `${usd(spent)} spent, ${usd(reserved)} reserved, ${usd(remaining)} remaining ` +
        `of ${usd(max)}.`;
    }
    const width = 1000;
    const scale = max > 0 ? width / Math.max(max, spent + reserved) : 0;
    const spentW = Math.min(width, spent * scale);
    const reservedW = Math.min(width - spentW, reserved * scale);
    const bar = s(
      "svg",
      {
        viewBox: `0 0 ${width} 20`,
        preserveAspectRatio: "none",
        className: "bar",
        role: "img",
        "aria-label": words,
        focusable: "false",
      },
      s("rect", { x: 0, y: 0, width, height: 20, className: max > 0 ? "remaining" : "unlimited" }),
      s("rect", { x: 0, y: 0, width: spentW, height: 20, className: "spent" }),
      s("rect", { x: spentW, y: 0, width: reservedW, height: 20, className: "reserved" }),
    );
    const legend = h(
      "ul",
      { className: "legend", "aria-hidden": "true" },
      h("li", {}, h("span", { className: "swatch spent" }), `Spent ${usd(spent)}`),
      h("li", {}, h("span", { className: "swatch reserved" }), `Reserved ${usd(reserved)}`),
      max > 0
        ? h("li", {}, h("span", { className: "swatch remaining" }), `Remaining ${usd(remaining)}`)
        : null,
      h("li", {}, max > 0 ? `Budget ${usd(max)}` : "No budget"),
    );
    return h("div", { className: "budget" }, bar, legend);
  }

  function days(start, end) {
    const out = [];
    const first = new Date(`${start}T00:00:00Z`);
    const last = new Date(`${end}T00:00:00Z`);
    if (Number.isNaN(first.getTime()) || Number.isNaN(last.getTime())) return out;
    for (let d = first; d <= last && out.length < 400; d = new Date(d.getTime() + 86400000)) {
      out.push(d.toISOString().slice(0, 10));
    }
    return out;
  }

  // Spend per day as bars, each with its own tooltip (<title>).
  function dayChart(usage) {
    const perDay = new Map();
    for (const row of usage.rows || []) {
      const day = perDay.get(row.date) || { cost: 0, requests: 0 };
      day.cost += Number(row.cost) || 0;
      day.requests += Number(row.requests) || 0;
      perDay.set(row.date, day);
    }
    const dates = days(usage.start_date, usage.end_date);
    // drawn at about the width it is shown at, so its text stays readable on a phone
    const W = Math.max(320, Math.min(720, Math.round(main.clientWidth - 48)));
    const H = 220;
    const left = 64;
    const bottom = 28;
    const top = 12;
    const plotW = W - left - 8;
    const plotH = H - top - bottom;
    const peak = Math.max(0, ...dates.map((d) => (perDay.get(d) || { cost: 0 }).cost));
    const total = dates.reduce((sum, d) => sum + (perDay.get(d) || { cost: 0 }).cost, 0);
    const label =
      `Spend per day from ${usage.start_date} to ${usage.end_date}: ${usd(total)} in all` +
      (peak > 0 ? `, at most ${usd(peak)} on one day.` : ", none.");
    const chart = s("svg", {
      viewBox: `0 0 ${W} ${H}`,
      className: "chart",
      role: "img",
      "aria-label": label,
      focusable: "false",
    });
    chart.append(s("title", {}, label));
    const yMax = peak > 0 ? peak : 1;
    for (const fraction of [0, 0.5, 1]) {
      const y = top + plotH - fraction * plotH;
      chart.append(
        s("line", { x1: left, x2: W - 8, y1: y, y2: y, className: "grid" }),
        s(
          "text",
          { x: left - 6, y: y + 4, className: "axis", "text-anchor": "end" },
          peak > 0 ? usd(yMax * fraction) : fraction === 0 ? "$0" : "",
        ),
      );
    }
    const slot = dates.length ? plotW / dates.length : plotW;
    // a day's label every few bars, at least ~48 px apart, and always the last day's
    const every = Math.max(1, Math.ceil(48 / slot), Math.ceil(dates.length / 8));
    const last = dates.length - 1;
    dates.forEach((date, i) => {
      const day = perDay.get(date) || { cost: 0, requests: 0 };
      const height = (day.cost / yMax) * plotH;
      const x = left + i * slot + slot * 0.15;
      const bar = s("rect", {
        x,
        y: top + plotH - height,
        width: Math.max(1, slot * 0.7),
        height: Math.max(day.cost > 0 ? 1 : 0, height),
        className: "day",
        "data-date": date,
      });
      bar.append(s("title", {}, `${date}: ${usd(day.cost)}, ${count(day.requests)} requests`));
      chart.append(bar);
      if (i === last || (i % every === 0 && last - i >= every)) {
        chart.append(
          s(
            "text",
            i === last // ends under its bar, inside the chart
              ? { x: x + slot * 0.7, y: H - 8, className: "axis", "text-anchor": "end" }
              : { x: x + slot * 0.35, y: H - 8, className: "axis", "text-anchor": "middle" },
            date.slice(5),
          ),
        );
      }
    });
    return chart;
  }

  function usageSection(view, query, title) {
    const body = h("div", { className: "usage-body" }, h("p", {}, "Loading spend…"));
    const section = h(
      "section",
      { className: "panel", "aria-labelledby": "usage-title" },
      h("h2", { id: "usage-title" }, title || `Spend, last ${USAGE_DAYS} days`),
      body,
    );
    (async () => {
      try {
        const usage = await api("GET", query);
        if (!view.alive()) return;
        body.replaceChildren(...usageParts(usage));
      } catch (err) {
        if (!view.alive()) return;
        body.replaceChildren(h("p", { className: "error", role: "alert" }, describe(err)));
      }
    })();
    return section;
  }

  function usageParts(usage) {
    const totals = usage.totals || {};
    const summary = h(
      "p",
      { className: "totals", id: "usage-totals" },
      `${count(totals.requests)} requests, ${count(totals.total_tokens)} tokens, `,
      h("strong", {}, usd(totals.cost)),
      ` from ${usage.start_date} to ${usage.end_date} (UTC days).`,
    );
    const byModel = new Map();
    for (const row of usage.rows || []) {
      const m = byModel.get(row.model) || { requests: 0, prompt: 0, completion: 0, cost: 0 };
      m.requests += Number(row.requests) || 0;
      m.prompt += Number(row.prompt_tokens) || 0;
      m.completion += Number(row.completion_tokens) || 0;
      m.cost += Number(row.cost) || 0;
      byModel.set(row.model, m);
    }
    const modelRows = [...byModel.entries()].sort((a, b) => b[1].cost - a[1].cost);
    const perModel = modelRows.length
      ? table(
          "Spend per model",
          ["Model", "Requests", "Prompt tokens", "Completion tokens", "Cost"],
          modelRows.map(([model, m]) => [
            model || "(none)",
            count(m.requests),
            count(m.prompt),
            count(m.completion),
            usd(m.cost),
          ]),
          "per-model",
        )
      : h("p", {}, "No spend in this period.");
    const dayRows = (usage.rows || []).map((row) => [
      row.date,
      row.model || "(none)",
      count(row.requests),
      count(Number(row.prompt_tokens) + Number(row.completion_tokens)),
      usd(row.cost),
    ]);
    const perDay = h(
      "details",
      {},
      h("summary", {}, "Spend per day and model, as a table"),
      dayRows.length
        ? table("Spend per day", ["Day", "Model", "Requests", "Tokens", "Cost"], dayRows, "per-day")
        : h("p", {}, "No rows."),
    );
    return [
      summary,
      h("figure", {}, dayChart(usage), h("figcaption", {}, "Spend per day (UTC); hover a bar for its day.")),
      perModel,
      perDay,
    ];
  }

  // A table whose rows become labelled cards on a narrow screen (app.css).
  function table(caption, headers, rows, className) {
    return h(
      "table",
      { className: `data ${className || ""}` },
      caption ? h("caption", {}, caption) : null,
      h("thead", {}, h("tr", {}, headers.map((name) => h("th", { scope: "col" }, name)))),
      h(
        "tbody",
        {},
        rows.map((cells) =>
          h(
            "tr",
            {},
            cells.map((cell, i) => h("td", { "data-label": headers[i] }, cell)),
          ),
        ),
      ),
    );
  }

  function statusBadge(status) {
    return h("span", { className: `badge ${status}` }, status || "unknown");
  }

  // ------------------------------------------------------------------ form values

  function readNumber(input, label, { whole = false, min = 0 } = {}) {
    if (input.validity && input.validity.badInput) throw new FormError(`${label} must be a number.`);
    const text = input.value.trim();
    if (text === "") return undefined;
    const value = Number(text);
    if (!Number.isFinite(value)) throw new FormError(`${label} must be a number.`);
    if (whole && !Number.isInteger(value)) throw new FormError(`${label} must be a whole number.`);
    if (value < min) throw new FormError(`${label} must be ${min} or more.`);
    return value;
  }

  function readList(input) {
    return input.value
      .split(/[,\s]+/)
      .map((item) => item.trim())
      .filter(Boolean);
  }

  function numberInput(attrs) {
    return h("input", { type: "number", inputmode: "decimal", min: "0", ...attrs });
  }

  // ------------------------------------------------------------------ sign in

  function renderSignIn() {
    nav.hidden = true;
    signOutButton.hidden = true;
    const view = startView("Sign in", { focus: false });
    const input = h("input", {
      type: "password",
      id: "token",
      autocomplete: "off",
      spellcheck: "false",
      required: true,
    });
    const submit = h("button", { type: "submit", id: "sign-in" }, "Sign in");
    const form = h(
      "form",
      { className: "panel narrow", novalidate: true, "aria-label": "Sign in" },
      field(
        "Admin token",
        input,
        "EXTAUTHZ_ADMIN_TOKEN (make run prints it). Kept in this browser tab only, until you sign out or close it.",
      ),
      h("div", { className: "actions" }, submit),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const token = input.value.trim();
      if (!token) {
        view.error(new FormError("Enter the admin token."));
        input.focus();
        return;
      }
      const ok = await busy(view, submit, async () => {
        await api("GET", "/api/keys?page_size=1", undefined, token);
        return true;
      });
      if (!ok) {
        input.select();
        input.focus();
        return;
      }
      session.keep(token);
      flash = "Signed in.";
      if (!location.hash || location.hash === "#" || location.hash === "#/") {
        location.hash = "#/keys";
      }
      route();
    });
    view.append(form);
    input.focus();
  }

  function signOut() {
    session.forget();
    main.replaceChildren();
    location.hash = "#/keys";
    route();
  }

  // ------------------------------------------------------------------ keys

  let pager = { filters: "", tokens: [""], page: 0 };
  const PAGE_SIZES = ["25", "50", "100"];

  function renderKeys(params) {
    const view = startView("Keys");
    const filters = {
      name: params.get("name") || "",
      user_id: params.get("user") || "",
      team_id: params.get("team") || "",
      status: params.get("status") || "",
      size: PAGE_SIZES.includes(params.get("size")) ? params.get("size") : "25",
    };
    const key = JSON.stringify(filters);
    if (pager.filters !== key) pager = { filters: key, tokens: [""], page: 0 };

    const name = h("input", { type: "search", value: filters.name, id: "filter-name" });
    const user = h("input", { type: "text", value: filters.user_id, id: "filter-user" });
    const team = h("input", { type: "text", value: filters.team_id, id: "filter-team" });
    const status = h(
      "select",
      { id: "filter-status" },
      [
        ["", "Any"],
        ["active", "Active"],
        ["revoked", "Revoked"],
        ["expired", "Expired"],
      ].map(([value, label]) => h("option", { value }, label)),
    );
    status.value = filters.status;
    const size = h(
      "select",
      { id: "filter-size" },
      PAGE_SIZES.map((n) => h("option", { value: n }, n)),
    );
    size.value = filters.size;
    const form = h(
      "form",
      { className: "panel filters", role: "search", "aria-label": "Search keys" },
      h(
        "div",
        { className: "grid" },
        field("Name or key ID", name, "Part of the name, or the ID"),
        field("User ID", user),
        field("Team ID", team),
        field("Status", status),
        field("Per page", size),
      ),
      h(
        "div",
        { className: "actions" },
        h("button", { type: "submit" }, "Search"),
        h("a", { href: "#/keys", className: "button secondary" }, "Clear"),
        h("a", { href: "#/create", className: "button secondary" }, "Create key"),
      ),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const wanted = `#/keys${q({
        name: name.value.trim(),
        user: user.value.trim(),
        team: team.value.trim(),
        status: status.value,
        size: size.value === "25" ? "" : size.value,
      })}`;
      if (location.hash === wanted) {
        pager = { filters: "", tokens: [""], page: 0 };
        route();
      } else {
        location.hash = wanted;
      }
    });
    const results = h("section", { className: "results", "aria-labelledby": "results-title" });
    view.append(form, results);
    loadKeys(view, filters, results);
  }

  async function loadKeys(view, filters, results) {
    const pageSize = Number(filters.size);
    const start = pager.tokens[pager.page];
    const countLine = h("p", { id: "results-count", role: "status" }, "Loading keys…");
    results.replaceChildren(h("h2", { id: "results-title", className: "visually-hidden" }, "Results"), countLine);
    let keys;
    let next;
    let scanned = 0;
    try {
      const base = { user_id: filters.user_id, team_id: filters.team_id, status: filters.status };
      if (!filters.name) {
        const page = await api("GET", `/api/keys${q({ ...base, page_size: pageSize, page_token: start })}`);
        keys = page.keys || [];
        next = page.next_page_token || "";
      } else {
        // The API filters by user, team and status; a name (or ID) is matched here, over
        // pages of 500, until a page's worth of keys matched or 20 pages were read.
        const needle = filters.name.toLowerCase();
        keys = [];
        next = start;
        let calls = 0;
        do {
          const page = await api("GET", `/api/keys${q({ ...base, page_size: 500, page_token: next })}`);
          const got = page.keys || [];
          scanned += got.length;
          keys.push(
            ...got.filter(
              (k) => (k.name || "").toLowerCase().includes(needle) || k.id.toLowerCase().startsWith(needle),
            ),
          );
          next = page.next_page_token || "";
          calls += 1;
        } while (next && keys.length < pageSize && calls < 20);
      }
    } catch (err) {
      if (!view.alive()) return;
      countLine.textContent = "";
      view.error(err);
      return;
    }
    if (!view.alive()) return;
    const pageNo = pager.page + 1;
    const searched = filters.name ? ` (the name matched in ${count(scanned)} keys read)` : "";
    countLine.textContent = keys.length
      ? `Page ${pageNo}: ${keys.length} key${keys.length === 1 ? "" : "s"}${searched}.`
      : `No keys match${searched}.`;
    const rows = keys.map((k) => [
      h("a", { href: `#/keys/${seg(k.id)}` }, k.name || "(no name)"),
      h("code", {}, k.id),
      k.user_id || "—",
      k.team_id || "—",
      statusBadge(k.status),
      usd(k.spent),
      Number(k.max_budget) ? usd(k.max_budget) : "none",
      when(k.last_used),
    ]);
    if (rows.length) {
      results.append(
        table(
          null,
          ["Name", "Key ID", "User", "Team", "Status", "Spent", "Budget", "Last used"],
          rows,
          "keys",
        ),
      );
    }
    const prev = button("Previous page", () => {
      pager.page -= 1;
      loadKeys(view, filters, results).then(() => results.querySelector("#results-count")?.focus());
    }, "secondary");
    prev.disabled = pager.page === 0;
    const more = button("Next page", () => {
      pager.tokens[pager.page + 1] = next;
      pager.page += 1;
      loadKeys(view, filters, results).then(() => results.querySelector("#results-count")?.focus());
    }, "secondary");
    more.disabled = !next;
    countLine.setAttribute("tabindex", "-1");
    results.append(h("nav", { className: "pager", "aria-label": "Pages" }, prev, more));
  }

  // ------------------------------------------------------------------ one key

  async function renderKey(id, message, secret) {
    const view = startView("Key");
    if (message) view.say(message);
    let key;
    try {
      key = await api("GET", `/api/keys/${seg(id)}`);
    } catch (err) {
      if (view.alive()) {
        view.error(err);
        view.append(h("p", {}, h("a", { href: "#/keys" }, "Back to the keys")));
      }
      return;
    }
    if (!view.alive()) return;
    view.heading.textContent = key.name || "(no name)";
    document.title = `${key.name || key.id} · extauthz console`;
    if (secret) {
      view.append(
        secretPanel(
          "New secret",
          secret,
          "Copy it now: it is shown only this once. The old secret stops working after the grace period you chose.",
        ),
      );
    }
    const facts = [
      ["Key ID", h("code", {}, key.id)],
      ["Status", statusBadge(key.status)],
      ["Mode", key.enforce === false ? "shadow (nothing denied)" : "enforced"],
      ["User", key.user_id || "—"],
      ["Team", key.team_id || "—"],
      ["Models", models(key.allowed_models)],
      ["Requests / minute", limit(key.rpm_limit)],
      ["Tokens / minute", limit(key.tpm_limit)],
      ["In flight", inFlight(key)],
      ["Requests so far", count(key.total_requests)],
      ["Budget period", key.budget_duration ? `${key.budget_duration}, resets ${when(key.budget_reset_at)}` : "none"],
      ["Created", when(key.created_at)],
      ["Expires", key.expires_at ? when(key.expires_at) : "never"],
      ["Last used", when(key.last_used)],
    ];
    view.append(
      h(
        "section",
        { className: "panel", "aria-labelledby": "facts-title" },
        h("h2", { id: "facts-title" }, "Details"),
        h("dl", { className: "facts" }, facts.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)])),
      ),
      h(
        "section",
        { className: "panel", "aria-labelledby": "budget-title" },
        h("h2", { id: "budget-title" }, "Budget"),
        budgetBar(key),
      ),
      usageSection(view, `/api/keys/${seg(key.id)}/usage?days=${USAGE_DAYS}`),
      limitsForm(view, key),
      actions(view, key),
    );
  }

  function limitsForm(view, key) {
    const inputs = {
      name: h("input", { type: "text", value: key.name || "" }),
      max_budget: numberInput({ step: "any", value: String(key.max_budget ?? 0) }),
      budget_duration: h("input", { type: "text", value: key.budget_duration || "", placeholder: "30d" }),
      rpm_limit: numberInput({ step: "1", value: String(key.rpm_limit ?? 0) }),
      tpm_limit: numberInput({ step: "1", value: String(key.tpm_limit ?? 0) }),
      max_parallel_requests: numberInput({ step: "1", value: String(key.max_parallel_requests ?? 0) }),
      allowed_models: h("input", { type: "text", value: (key.allowed_models || []).join(", ") }),
      expires_days: numberInput({ step: "1", min: "1" }),
      enforce: h("input", { type: "checkbox", checked: key.enforce !== false }),
    };
    const save = h("button", { type: "submit" }, "Save limits");
    const form = h(
      "form",
      { className: "panel", "aria-labelledby": "limits-title", novalidate: true },
      h("h2", { id: "limits-title" }, "Limits"),
      h(
        "div",
        { className: "grid" },
        field("Name", inputs.name),
        field("Max budget (USD)", inputs.max_budget, "0: no budget"),
        field("Budget period", inputs.budget_duration, "e.g. 24h, 30d, 1mo; empty: never resets"),
        field("Requests per minute", inputs.rpm_limit, "0: no limit"),
        field("Tokens per minute", inputs.tpm_limit, "0: no limit"),
        field("Requests in flight", inputs.max_parallel_requests, "0: no limit"),
        field("Allowed models", inputs.allowed_models, "Comma-separated; * or empty: every model"),
        field("Expires in (days)", inputs.expires_days, "Empty: unchanged"),
        checkbox("Enforce", inputs.enforce, "Unchecked: shadow mode, the key's own limits deny nothing"),
      ),
      h("div", { className: "actions" }, save),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const updated = await busy(view, save, async () => {
        const patch = {};
        const name = inputs.name.value.trim();
        if (name !== (key.name || "")) patch.name = name;
        for (const [fieldName, label, whole] of LIMIT_NUMBERS) {
          const value = readNumber(inputs[fieldName], label, { whole });
          const now = value === undefined ? 0 : value;
          if (now !== Number(key[fieldName] || 0)) patch[fieldName] = now;
        }
        const duration = inputs.budget_duration.value.trim();
        if (duration !== (key.budget_duration || "")) patch.budget_duration = duration;
        let list = readList(inputs.allowed_models);
        if (list.length === 0) list = ["*"];
        if (list.join(",") !== (key.allowed_models || []).join(",")) patch.allowed_models = list;
        const expires = readNumber(inputs.expires_days, "Expires in", { whole: true, min: 1 });
        if (expires !== undefined) patch.expires_days = expires;
        if (inputs.enforce.checked !== (key.enforce !== false)) patch.enforce = inputs.enforce.checked;
        if (Object.keys(patch).length === 0) throw new FormError("Nothing to save: no field changed.");
        return api("PATCH", `/api/keys/${seg(key.id)}`, patch);
      });
      if (updated && view.alive()) renderKey(key.id, "Limits saved.");
    });
    return form;
  }

  function actions(view, key) {
    const grace = numberInput({ step: "1", value: "0", id: "grace" });
    const rotate = button("Rotate secret", async () => {
      const seconds = (() => {
        try {
          return readNumber(grace, "Grace period", { whole: true }) || 0;
        } catch (err) {
          view.error(err);
          return null;
        }
      })();
      if (seconds === null) return;
      const sure = await confirmAction(
        "Rotate this key's secret?",
        `A new secret is made for ${key.name || key.id}; the old one ${
          seconds ? `keeps working for ${seconds} seconds` : "stops working at once"
        }.`,
        "Rotate",
      );
      if (!sure) return;
      const reply = await busy(view, rotate, () =>
        api("POST", `/api/keys/${seg(key.id)}/rotate`, { grace_seconds: seconds }),
      );
      if (reply && view.alive()) renderKey(key.id, "Secret rotated.", reply.key);
    }, "secondary");
    const revoke = button("Revoke key", async () => {
      const sure = await confirmAction(
        "Revoke this key?",
        `${key.name || key.id} is refused from the next request on. This cannot be undone.`,
        "Revoke",
      );
      if (!sure) return;
      const reply = await busy(view, revoke, () => api("POST", `/api/keys/${seg(key.id)}/revoke`, {}));
      if (reply && view.alive()) renderKey(key.id, "Key revoked: its next request is refused.");
    }, "danger");
    revoke.disabled = key.status === "revoked";
    const remove = button("Delete key", async () => {
      const sure = await confirmAction(
        "Delete this key?",
        `${key.name || key.id} is removed; its usage history stays in user and team totals. This cannot be undone.`,
        "Delete",
      );
      if (!sure) return;
      const reply = await busy(view, remove, () => api("DELETE", `/api/keys/${seg(key.id)}`));
      if (reply && view.alive()) {
        flash = `Key ${key.name || key.id} deleted.`;
        location.hash = "#/keys";
      }
    }, "danger");
    return h(
      "section",
      { className: "panel", "aria-labelledby": "actions-title" },
      h("h2", { id: "actions-title" }, "Actions"),
      h(
        "div",
        { className: "grid" },
        field("Grace period for the old secret (seconds)", grace, "0: the old secret stops at once"),
      ),
      h("div", { className: "actions" }, rotate, revoke, remove),
    );
  }

  // ------------------------------------------------------------------ create

  function renderCreate() {
    const view = startView("Create a key");
    const inputs = {
      name: h("input", { type: "text", required: true }),
      user_id: h("input", { type: "text", required: true }),
      team_id: h("input", { type: "text" }),
      allowed_models: h("input", { type: "text", placeholder: "gpt-4, gpt-4o" }),
      max_budget: numberInput({ step: "any" }),
      budget_duration: h("input", { type: "text", placeholder: "30d" }),
      rpm_limit: numberInput({ step: "1" }),
      tpm_limit: numberInput({ step: "1" }),
      max_parallel_requests: numberInput({ step: "1" }),
      expires_days: numberInput({ step: "1", min: "1" }),
      enforce: h("input", { type: "checkbox", checked: true }),
    };
    const create = h("button", { type: "submit" }, "Create key");
    const form = h(
      "form",
      { className: "panel", novalidate: true, "aria-label": "New key" },
      h(
        "div",
        { className: "grid" },
        field("Name", inputs.name, "Required"),
        field("User ID", inputs.user_id, "Required: the user the key belongs to"),
        field("Team ID", inputs.team_id, "Optional: a team budget applies to its keys"),
        field("Allowed models", inputs.allowed_models, "Comma-separated; empty: every model"),
        field("Max budget (USD)", inputs.max_budget, "Empty: the server's default; 0: no budget"),
        field("Budget period", inputs.budget_duration, "e.g. 24h, 30d, 1mo; empty: never resets"),
        field("Requests per minute", inputs.rpm_limit, "Empty: the default; 0: no limit"),
        field("Tokens per minute", inputs.tpm_limit, "Empty: the default; 0: no limit"),
        field("Requests in flight", inputs.max_parallel_requests, "Empty: the default; 0: no limit"),
        field("Expires in (days)", inputs.expires_days, "Empty: the server's longest"),
        checkbox("Enforce", inputs.enforce, "Unchecked: shadow mode, the key's own limits deny nothing"),
      ),
      h("div", { className: "actions" }, create),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const reply = await busy(view, create, async () => {
        const spec = {};
        const name = inputs.name.value.trim();
        if (!name) throw new FormError("Give the key a name.");
        if (!inputs.user_id.value.trim()) throw new FormError("Name the user the key belongs to.");
        spec.name = name;
        for (const fieldName of ["user_id", "team_id", "budget_duration"]) {
          const value = inputs[fieldName].value.trim();
          if (value) spec[fieldName] = value;
        }
        const list = readList(inputs.allowed_models);
        if (list.length) spec.allowed_models = list;
        const numbers = [
          ...LIMIT_NUMBERS.map(([fieldName, label, whole]) => [fieldName, label, whole, 0]),
          ["expires_days", "Expires in", true, 1],
        ];
        for (const [fieldName, label, whole, min] of numbers) {
          const value = readNumber(inputs[fieldName], label, { whole, min });
          if (value !== undefined) spec[fieldName] = value;
        }
        if (!inputs.enforce.checked) spec.enforce = false;
        return api("POST", "/api/keys", spec);
      });
      if (!reply || !view.alive()) return;
      const data = reply.key_data || {};
      view.heading.textContent = "Key created";
      const panel = secretPanel(
        `${data.name || "The key"} is ready`,
        reply.key,
        "Copy the key now: it is shown only this once and cannot be read back later.",
      );
      form.replaceWith(
        panel,
        h(
          "p",
          { className: "actions" },
          h("a", { href: `#/keys/${seg(data.id)}`, className: "button secondary", id: "open-key" }, "Open the key's page"),
          button("Create another", () => renderCreate(), "secondary"),
        ),
      );
      panel.querySelector("#copy-secret").focus();
    });
    view.append(form);
  }

  // ------------------------------------------------------------------ budgets

  const SCOPES = [
    ["team", "Team"],
    ["user", "User"],
  ];

  function budgetForm(view, current) {
    const scope = h(
      "select",
      { disabled: Boolean(current) },
      SCOPES.map(([value, label]) => h("option", { value }, label)),
    );
    scope.value = current ? current.scope : "team";
    const inputs = {
      id: h("input", { type: "text", value: current ? current.id : "", required: true, readonly: Boolean(current) }),
      max_budget: numberInput({ step: "any", value: current ? String(current.max_budget) : "" }),
      budget_duration: h("input", { type: "text", value: current ? current.budget_duration : "", placeholder: "1mo" }),
      rpm_limit: numberInput({ step: "1", value: current ? String(current.rpm_limit) : "" }),
      tpm_limit: numberInput({ step: "1", value: current ? String(current.tpm_limit) : "" }),
      max_parallel_requests: numberInput({ step: "1", value: current ? String(current.max_parallel_requests) : "" }),
    };
    const save = h("button", { type: "submit", id: "save-budget" }, current ? "Save budget" : "Set budget");
    const form = h(
      "form",
      { className: "panel", novalidate: true, "aria-labelledby": "budget-form-title" },
      h("h2", { id: "budget-form-title" }, current ? "Change this budget" : "Set a budget"),
      h(
        "p",
        { className: "hint" },
        "Sets the whole configuration: a field left empty is 0 (none). What was spent and reserved carries over.",
      ),
      h(
        "div",
        { className: "grid" },
        field("Scope", scope),
        field("ID", inputs.id, "The team_id or user_id its keys carry"),
        field("Max budget (USD)", inputs.max_budget, "0 or empty: no budget"),
        field("Budget period", inputs.budget_duration, "e.g. 24h, 30d, 1mo; empty: never resets"),
        field("Requests per minute", inputs.rpm_limit, "0 or empty: no limit"),
        field("Tokens per minute", inputs.tpm_limit, "0 or empty: no limit"),
        field("Requests in flight", inputs.max_parallel_requests, "0 or empty: no limit"),
      ),
      h("div", { className: "actions" }, save),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const chosen = scope.value;
      const id = inputs.id.value.trim();
      const saved = await busy(view, save, async () => {
        if (!id) throw new FormError("Name the team or user the budget is for.");
        const spec = {
          max_budget: readNumber(inputs.max_budget, "Max budget") || 0,
          budget_duration: inputs.budget_duration.value.trim(),
          rpm_limit: readNumber(inputs.rpm_limit, "Requests per minute", { whole: true }) || 0,
          tpm_limit: readNumber(inputs.tpm_limit, "Tokens per minute", { whole: true }) || 0,
          max_parallel_requests:
            readNumber(inputs.max_parallel_requests, "Requests in flight", { whole: true }) || 0,
        };
        return api("PUT", `/api/budgets/${seg(chosen)}/${seg(id)}`, spec);
      });
      if (!saved || !view.alive()) return;
      flash = `${chosen === "team" ? "Team" : "User"} budget ${id} saved.`;
      const target = `#/budgets/${seg(chosen)}/${seg(id)}`;
      if (location.hash === target) route();
      else location.hash = target;
    });
    return form;
  }

  function renderBudgets() {
    const view = startView("Budgets");
    view.append(
      h(
        "p",
        { className: "lead" },
        "A budget sits above keys: every key with that team_id (or user_id) draws on it together, and a request passes only when its key and each budget above it pass.",
      ),
    );
    for (const [scope, label] of SCOPES) {
      const body = h("div", {}, h("p", {}, "Loading…"));
      view.append(
        h(
          "section",
          { className: "panel", "aria-labelledby": `${scope}-budgets` },
          h("h2", { id: `${scope}-budgets` }, `${label} budgets`),
          body,
        ),
      );
      (async () => {
        try {
          const reply = await api("GET", `/api/budgets/${scope}`);
          if (!view.alive()) return;
          const budgets = reply.budgets || [];
          if (!budgets.length) {
            body.replaceChildren(h("p", {}, `No ${scope} budgets yet.`));
            return;
          }
          body.replaceChildren(
            table(
              null,
              [label, "Spend", "Limits", "Period"],
              budgets.map((b) => [
                h("a", { href: `#/budgets/${seg(scope)}/${seg(b.id)}` }, b.id),
                budgetBar(b),
                limits(b),
                b.budget_duration ? `${b.budget_duration}, resets ${when(b.budget_reset_at)}` : "none",
              ]),
              "budgets",
            ),
          );
        } catch (err) {
          if (view.alive()) body.replaceChildren(h("p", { className: "error", role: "alert" }, describe(err)));
        }
      })();
    }
    view.append(budgetForm(view, null));
  }

  async function renderBudget(scope, id) {
    const label = scope === "user" ? "User" : "Team";
    const view = startView(`${label} budget: ${id}`);
    let budget;
    try {
      budget = await api("GET", `/api/budgets/${seg(scope)}/${seg(id)}`);
    } catch (err) {
      if (view.alive()) {
        view.error(err);
        view.append(h("p", {}, h("a", { href: "#/budgets" }, "Back to the budgets")));
      }
      return;
    }
    if (!view.alive()) return;
    const remove = button("Delete budget", async () => {
      const sure = await confirmAction(
        "Delete this budget?",
        `The ${scope} budget of ${id} and its open reservations are removed; its keys keep their own limits.`,
        "Delete",
      );
      if (!sure) return;
      const reply = await busy(view, remove, () => api("DELETE", `/api/budgets/${seg(scope)}/${seg(id)}`));
      if (reply && view.alive()) {
        flash = `${label} budget ${id} deleted.`;
        location.hash = "#/budgets";
      }
    }, "danger");
    const facts = [
      ["Requests / minute", limit(budget.rpm_limit)],
      ["Tokens / minute", limit(budget.tpm_limit)],
      ["In flight", inFlight(budget)],
      ["Budget period", budget.budget_duration ? `${budget.budget_duration}, resets ${when(budget.budget_reset_at)}` : "none"],
      ["Created", when(budget.created_at)],
    ];
    const usageQuery = `/api/usage${q({ [scope === "user" ? "user_id" : "team_id"]: id, days: USAGE_DAYS })}`;
    view.append(
      h(
        "section",
        { className: "panel", "aria-labelledby": "budget-title" },
        h("h2", { id: "budget-title" }, "Budget"),
        budgetBar(budget),
        h("dl", { className: "facts" }, facts.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)])),
      ),
      usageSection(view, usageQuery, `Spend of every ${scope === "user" ? "key of this user" : "key of this team"}, last ${USAGE_DAYS} days`),
      budgetForm(view, budget),
      h(
        "section",
        { className: "panel", "aria-labelledby": "budget-actions" },
        h("h2", { id: "budget-actions" }, "Actions"),
        h("div", { className: "actions" }, remove, h("a", { href: "#/budgets", className: "button secondary" }, "All budgets")),
      ),
    );
  }

  // ------------------------------------------------------------------ health

  async function checkHealth() {
    const box = document.getElementById("health");
    const text = document.getElementById("health-text");
    let state;
    let words;
    try {
      const reply = await fetch("/ui/health", { cache: "no-store", credentials: "omit" });
      let body = null;
      try {
        body = await reply.json();
      } catch (err) {
        body = null;
      }
      if (reply.ok) {
        state = "ok";
        words = "Server: ready";
      } else if (body && body.message) {
        state = "bad";
        words = `Server: not ready (${body.message})`;
      } else {
        state = "bad";
        words = `Server: unreachable through Envoy (HTTP ${reply.status})`;
      }
    } catch (err) {
      state = "bad";
      words = "Server: no answer (network error)";
    }
    box.dataset.state = state;
    if (text.textContent !== words) text.textContent = words;
  }

  // ------------------------------------------------------------------ routing

  function route() {
    if (!session.token()) {
      renderSignIn();
      return;
    }
    nav.hidden = false;
    signOutButton.hidden = false;
    const raw = location.hash.replace(/^#/, "");
    const [path, query] = raw.split("?");
    const parts = (path || "").split("/").filter(Boolean).map((p) => {
      try {
        return decodeURIComponent(p);
      } catch (err) {
        return p;
      }
    });
    const params = new URLSearchParams(query || "");
    const section = parts[0] || "keys";
    for (const link of nav.querySelectorAll("a[data-nav]")) {
      if (link.dataset.nav === section) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    if (section === "keys" && parts[1]) renderKey(parts[1]);
    else if (section === "create") renderCreate();
    else if (section === "budgets" && parts[1] && parts[2]) renderBudget(parts[1], parts[2]);
    else if (section === "budgets") renderBudgets();
    else renderKeys(params);
  }

  window.addEventListener("hashchange", () => {
    if (location.hash === "#main") return; // the skip link
    route();
  });
  document.getElementById("skip-link").addEventListener("click", (event) => {
    event.preventDefault();
    const heading = main.querySelector("h1");
    (heading || main).focus();
  });
  signOutButton.addEventListener("click", signOut);
  checkHealth();
  setInterval(checkHealth, HEALTH_EVERY_MS);
  route();
})();
