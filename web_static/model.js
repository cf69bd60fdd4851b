// model.html: the model card (Markdown shipped with the site by `builder site --card`).
import { renderMarkdown } from "./markdown.js";

const doc = document.getElementById("doc");
try {
  const site = await (await fetch("site.json")).json();
  if (!site.card) throw new Error("this site was built without a model card (builder site --card FILE)");
  const res = await fetch(site.card);
  if (!res.ok) throw new Error(`${site.card}: HTTP ${res.status}`);
  doc.replaceChildren(renderMarkdown(await res.text(), new URL(site.card, location.href).href));
} catch (e) {
  doc.textContent = `No model card: ${e.message}`;
}
