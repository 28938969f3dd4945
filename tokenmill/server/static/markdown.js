// A small, safe Markdown renderer for model replies: renderMarkdown(text) -> HTML string.
//
// Safety: every piece of the input is HTML-escaped before it is placed in the output; the
// only tags are the ones written here; a link's href must start with http://, https:// or
// mailto: (anything else, javascript: and data: included, stays text). Images are not
// loaded. Supported: ``` / ~~~ code fences (an unclosed fence runs to the end, as while
// streaming), `inline code`, **bold**, *italic*, _italic_, ~~strike~~, [links](url), bare
// http(s) URLs, # headings, - / * / 1. lists, > quotes, --- rules, | tables |, paragraphs.

const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
export function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ESC[c]);
}

const SAFE_URL = /^(https?:\/\/|mailto:)[^\s"'<>`]*$/i;

// Inline spans of one block of text (raw, unescaped). Code spans and links are cut out
// first and stand in as \u0000N\u0000 while the emphasis rules run on escaped text.
function inline(raw) {
  const held = [];
  const hold = (html) => `\u0000${held.push(html) - 1}\u0000`;
  let s = raw.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g,
    (_, __, code) => hold(`<code>${escapeHtml(code)}</code>`));
  s = s.replace(/\[([^\]\n]+)\]\(\s*<?([^\s)<>]+)>?\s*\)/g, (whole, text, url) =>
    SAFE_URL.test(url) ? hold(link(url, emphasis(escapeHtml(text)))) : whole);
  s = s.replace(/\bhttps?:\/\/[^\s"'<>()`\u0000]*[^\s"'<>()`\u0000.,;:!?*_~]/g,
    (url) => hold(link(url, escapeHtml(url))));
  s = emphasis(escapeHtml(s));
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => held[Number(i)]);
}

function link(url, html) {
  return `<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer">${html}</a>`;
}

function emphasis(s) {
  return s
    .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/__(?=\S)([\s\S]*?\S)__/g, "<strong>$1</strong>")
    .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>")
    .replace(/\*(?=[^\s*])([^*]*?[^\s*])\*/g, "<em>$1</em>")
    .replace(/(^|[^\w])_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>");
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

// "| a | b |" -> ["a", "b"]
const cells = (line) => line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|")
  .map((c) => c.trim());

export function renderMarkdown(text) {
  const lines = String(text).replace(/\u0000/g, "\uFFFD").replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = FENCE.exec(line))) {
      const close = new RegExp(`^ {0,3}${m[1][0] === "`" ? "`" : "~"}{${m[1].length},}\\s*$`);
      const body = [];
      for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
      i++;
      const lang = m[2] ? ` class="language-${escapeHtml(m[2])}"` : "";
      out.push(`<pre><code${lang}>${escapeHtml(body.join("\n"))}</code></pre>`);
    } else if (!line.trim()) {
      i++;
    } else if ((m = HEADING.exec(line))) {
      const n = m[1].length;
      out.push(`<h${n}>${inline(m[2])}</h${n}>`);
      i++;
    } else if (line.includes("|") && i + 1 < lines.length && lines[i + 1].includes("-")
               && TABLE_RULE.test(lines[i + 1])) {
      const head = cells(line);
      const rows = [];
      for (i += 2; i < lines.length && lines[i].includes("|"); i++) rows.push(cells(lines[i]));
      const tr = (row, tag) => `<tr>${head.map((_, k) => `<${tag}>${inline(row[k] ?? "")}</${tag}>`)
        .join("")}</tr>`;
      out.push(`<table><thead>${tr(head, "th")}</thead>`
               + `<tbody>${rows.map((r) => tr(r, "td")).join("")}</tbody></table>`);
    } else if (RULE.test(line)) {
      out.push("<hr>");
      i++;
    } else if (QUOTE.test(line)) {
      const body = [];
      for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) body.push(m[1]);
      out.push(`<blockquote>${renderMarkdown(body.join("\n"))}</blockquote>`);
    } else if ((m = ITEM.exec(line))) {
      const ordered = /\d/.test(m[2]);
      const indent = m[1].length;
      const items = [];
      while (i < lines.length) {
        const it = ITEM.exec(lines[i]);
        if (it && it[1].length <= indent + 1 && /\d/.test(it[2]) === ordered) {
          items.push([it[3]]);
          i++;
        } else if (items.length && lines[i].trim() && !FENCE.test(lines[i])
                   && (/^\s/.test(lines[i]) || (!it && !HEADING.test(lines[i])))) {
          items[items.length - 1].push(lines[i].replace(/^\s{0,4}/, ""));  // continuation
          i++;
        } else {
          break;
        }
      }
      const start = ordered && parseInt(m[2], 10) !== 1 ? ` start="${parseInt(m[2], 10)}"` : "";
      const tag = ordered ? "ol" : "ul";
      out.push(`<${tag}${start}>${items.map((it) => `<li>${item(it)}</li>`).join("")}</${tag}>`);
    } else {
      const para = [];
      for (; i < lines.length && lines[i].trim() && !FENCE.test(lines[i])
             && !HEADING.test(lines[i]) && !QUOTE.test(lines[i]) && !RULE.test(lines[i])
             && !(para.length && ITEM.test(lines[i]))
             && !(lines[i].includes("|") && TABLE_RULE.test(lines[i + 1] ?? "")); i++) {
        para.push(lines[i]);
      }
      out.push(`<p>${para.map(inline).join("<br>")}</p>`);
    }
  }
  return out.join("\n");
}

// A list item: its first line inline; nested lists and other blocks rendered in full.
function item(lines) {
  if (lines.length === 1) return inline(lines[0]);
  const html = renderMarkdown(lines.join("\n"));
  return html.startsWith("<p>") && html.indexOf("<p>", 1) < 0
    ? html.replace(/^<p>/, "").replace(/<\/p>/, "") : html;
}
