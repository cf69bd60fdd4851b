// A small Markdown renderer for the model card: headings, paragraphs, lists, fenced code, tables,
// block quotes, rules, links, images, inline code, bold and italics. Everything is built with DOM
// nodes and textContent (never innerHTML), so nothing in the card can inject markup or script;
// raw HTML (<!-- comments --> included) is dropped and YAML front matter is skipped.
// Character references (&lt; &#124; ...) outside code are decoded into text, as Markdown renderers do:
// builder/card.py escapes every value it puts in the card that way.

const BLOCK_START = /^(#{1,6}\s|```|>|\s*([-*+]|\d+[.)])\s|\|)/;

export function renderMarkdown(src, base = document.baseURI) {
  const root = document.createDocumentFragment();
  let lines = src.replace(/\r\n?/g, "\n").replace(/<!--[\s\S]*?-->/g, "").split("\n");
  if (lines[0] === "---") {  // front matter: metadata for the Hub, not for readers
    const end = lines.indexOf("---", 1);
    if (end > 0) lines = lines.slice(end + 1);
  }
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) { i++; continue; }
    if ((m = line.match(/^(#{1,6})\s+(.*?)\s*#*\s*$/))) {
      root.append(block(`h${m[1].length}`, m[2], base)); i++;
    } else if (line.startsWith("```")) {
      const code = [];
      for (i++; i < lines.length && !lines[i].startsWith("```"); i++) code.push(lines[i]);
      i++;
      const pre = document.createElement("pre"), c = document.createElement("code");
      c.textContent = code.join("\n");
      pre.append(c);
      root.append(pre);
    } else if (/^(\*\s*){3,}$|^(-\s*){3,}$|^(_\s*){3,}$/.test(line.trim())) {
      root.append(document.createElement("hr")); i++;
    } else if (line.startsWith(">")) {
      const quote = [];
      for (; i < lines.length && lines[i].startsWith(">"); i++) quote.push(lines[i].replace(/^>\s?/, ""));
      const bq = document.createElement("blockquote");
      bq.append(renderMarkdown(quote.join("\n"), base));
      root.append(bq);
    } else if (line.trim().startsWith("|") && i + 1 < lines.length && /^\s*\|?\s*:?-+/.test(lines[i + 1])) {
      const rows = [];
      for (; i < lines.length && lines[i].trim().startsWith("|"); i++) rows.push(cells(lines[i]));
      const table = document.createElement("table"), thead = document.createElement("thead"),
        tbody = document.createElement("tbody");
      thead.append(row(rows[0], "th", base));
      rows.slice(2).forEach((r) => tbody.append(row(r, "td", base)));
      table.append(thead, tbody);
      root.append(table);
    } else if ((m = line.match(/^\s*([-*+]|\d+[.)])\s+/))) {
      const list = document.createElement(/\d/.test(m[1]) ? "ol" : "ul");
      while (i < lines.length && (m = lines[i].match(/^\s*([-*+]|\d+[.)])\s+(.*)$/))) {
        let text = m[2];
        for (i++; i < lines.length && /^\s{2,}\S/.test(lines[i]) && !/^\s*([-*+]|\d+[.)])\s/.test(lines[i]); i++) {
          text += " " + lines[i].trim();  // a wrapped list item
        }
        list.append(block("li", text, base));
      }
      root.append(list);
    } else {
      const para = [];
      for (; i < lines.length && lines[i].trim() && !BLOCK_START.test(lines[i]); i++) para.push(lines[i].trim());
      if (!para.length) { para.push(line.trim()); i++; }
      root.append(block("p", para.join(" "), base));
    }
  }
  return root;
}

function cells(line) {
  return line.trim().replace(/^\|/, "").replace(/\|$/, "").split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

function row(values, tag, base) {
  const tr = document.createElement("tr");
  values.forEach((v) => tr.append(block(tag, v, base)));
  return tr;
}

function block(tag, text, base) {
  const e = document.createElement(tag);
  e.append(inline(text, base));
  return e;
}

const INLINE = /(`+)([\s\S]*?)\1|!\[([^\]]*)\]\(([^)\s]+)\)|\[([^\]]+)\]\(([^)\s]+)\)|\*\*([^*]+)\*\*|__([^_]+)__|\*([^*\s][^*]*)\*|<(https?:\/\/[^>]+)>|<[^>]*>/;

const REFERENCE = /&(?:#([0-9]{1,7})|#[xX]([0-9a-fA-F]{1,6})|(amp|lt|gt|quot|apos|nbsp));/g;
const NAMED = { amp: "&", lt: "<", gt: ">", quot: '"', apos: "'", nbsp: "\u00a0" };

/** Text with its character references decoded (the named ones an escaper writes, and numeric ones). */
export function decodeReferences(text) {
  return text.replace(REFERENCE, (ref, dec, hex, name) => {
    if (name) return NAMED[name];
    const cp = parseInt(dec ?? hex, dec ? 10 : 16);
    return cp > 0 && cp <= 0x10ffff && !(cp >= 0xd800 && cp <= 0xdfff) ? String.fromCodePoint(cp) : "\ufffd";
  });
}

/** Inline markup -> nodes. Links keep only http(s), relative and #fragment targets. */
export function inline(text, base) {
  const frag = document.createDocumentFragment();
  let m;
  while ((m = text.match(INLINE))) {
    if (m.index) frag.append(decodeReferences(m.input.slice(0, m.index)));
    if (m[1]) frag.append(node("code", m[2].trim()));
    else if (m[4] !== undefined) {
      const img = document.createElement("img");
      img.alt = decodeReferences(m[3]);
      if (safe(m[4], base)) img.src = m[4];
      frag.append(img);
    } else if (m[6] !== undefined) frag.append(link(inline(m[5], base), m[6], base));
    else if (m[7] !== undefined || m[8] !== undefined) frag.append(node("strong", inline(m[7] ?? m[8], base)));
    else if (m[9] !== undefined) frag.append(node("em", inline(m[9], base)));
    else if (m[10] !== undefined) frag.append(link(m[10], m[10], base));
    // else: raw HTML tag, dropped
    text = text.slice(m.index + m[0].length);
  }
  if (text) frag.append(decodeReferences(text));
  return frag;
}

function node(tag, child) {
  const e = document.createElement(tag);
  e.append(child);
  return e;
}

function safe(url, base) {
  try { return ["http:", "https:"].includes(new URL(url, base).protocol); } catch { return false; }
}

function link(child, href, base) {
  if (!safe(href, base)) return child;
  const a = document.createElement("a");
  a.href = href;
  a.append(child);
  return a;
}
