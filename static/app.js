// AI-Sight progressive enhancement. The page works fully without this file (plain form POST);
// with it: a preview of the chosen photo, a size check before uploading, and the result shown
// without a full page load (the server's own result page, fetched and swapped in).
"use strict";

(function () {
  let previewUrl = null;

  function formParts(form) {
    return {
      input: form.querySelector('input[type="file"][name="image"]'),
      preview: form.querySelector(".preview"),
      clientError: form.querySelector(".client-error"),
      button: form.querySelector('button[type="submit"]'),
      progress: form.querySelector(".progress"),
    };
  }

  function showError(parts, message) {
    if (!parts.clientError) return;
    parts.clientError.textContent = message;
    parts.clientError.hidden = !message;
  }

  function formatSize(bytes) {
    return bytes >= 1048576 ? (bytes / 1048576).toFixed(1) + " MB" : Math.max(1, Math.round(bytes / 1024)) + " KB";
  }

  function tooLarge(form, file) {
    const max = Number(form.dataset.maxBytes || 0);
    return max > 0 && file.size > max;
  }

  function onChange(event) {
    const input = event.target;
    if (!input.matches('form.upload input[type="file"]')) return;
    const form = input.form;
    const parts = formParts(form);
    showError(parts, "");
    if (previewUrl) {
      URL.revokeObjectURL(previewUrl);
      previewUrl = null;
    }
    const file = input.files && input.files[0];
    if (!file) {
      parts.preview.hidden = true;
      return;
    }
    const img = parts.preview.querySelector("img");
    const caption = parts.preview.querySelector("figcaption");
    caption.textContent = file.name + " · " + formatSize(file.size);
    previewUrl = URL.createObjectURL(file);
    // Browsers that cannot show a format (HEIC outside Safari) keep only the caption.
    img.hidden = false;
    img.onerror = function () { img.hidden = true; };
    img.src = previewUrl;
    parts.preview.hidden = false;
    if (tooLarge(form, file)) {
      showError(parts, "This file is larger than " + form.dataset.maxMb + " MB. Choose a smaller photo.");
    }
  }

  function setBusy(parts, busy) {
    parts.button.disabled = busy;
    parts.progress.hidden = !busy;
  }

  // The server's result page sends its answer first and the photo with its heatmap after (marked by
  // this comment): the answer is swapped in as soon as it has arrived, the whole page once it has all.
  const ANSWER_END = "<!--aisight:answer-end-->";

  function swapIn(html, again) {
    const doc = new DOMParser().parseFromString(html, "text/html");
    const next = doc.querySelector("main");
    const main = document.querySelector("main");
    if (!next || !main) return false;
    const hadFocus = again && document.activeElement && document.activeElement.matches("main h1");
    main.replaceChildren(...Array.from(next.childNodes).map((n) => document.importNode(n, true)));
    document.title = doc.title;
    const heading = main.querySelector("h1");
    if (!again) {
      window.scrollTo(0, 0);
      if (heading) heading.focus();
    } else if (hadFocus && heading) {
      heading.focus({ preventScroll: true }); // the same page, completed: the reader stays where it was
    }
    return true;
  }

  // Read an HTML answer as it arrives; swap in its answer part early. Returns the whole text.
  async function readPage(response) {
    if (!response.body || !response.body.getReader) return { text: await response.text(), early: false };
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let text = "";
    let early = false;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
      const end = text.indexOf(ANSWER_END);
      if (!early && end >= 0) early = swapIn(text.slice(0, end + ANSWER_END.length), false);
    }
    return { text: text + decoder.decode(), early: early };
  }

  async function onSubmit(event) {
    const form = event.target;
    if (!form.matches("form.upload")) return;
    const parts = formParts(form);
    const file = parts.input.files && parts.input.files[0];
    if (!file) return; // let the browser's own "required" message, or the server, handle it
    if (tooLarge(form, file)) {
      event.preventDefault();
      showError(parts, "This file is larger than " + form.dataset.maxMb + " MB. Choose a smaller photo.");
      return;
    }
    event.preventDefault();
    showError(parts, "");
    setBusy(parts, true);
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body: new FormData(form),
        headers: { Accept: "text/html" },
        credentials: "same-origin",
      });
      const type = response.headers.get("Content-Type") || "";
      if (type.startsWith("application/json")) {
        // The front proxy's own answers (busy, rate limit, too large) are JSON with a message for people.
        const text = await response.text();
        setBusy(parts, false);
        showError(parts, jsonMessage(text) || "The server answered HTTP " + response.status + ". Try again.");
        return;
      }
      if (!type.startsWith("text/html")) throw new Error("HTTP " + response.status);
      const page = await readPage(response);
      if (!swapIn(page.text, page.early)) throw new Error("HTTP " + response.status);
    } catch (err) {
      setBusy(parts, false);
      showError(parts, "The photo could not be sent (" + err.message + "). Check your connection and try again.");
    }
  }

  function jsonMessage(text) {
    try {
      const body = JSON.parse(text);
      return body && body.error && typeof body.error.message === "string" ? body.error.message : "";
    } catch (err) {
      return "";
    }
  }

  document.addEventListener("change", onChange);
  document.addEventListener("submit", onSubmit);
})();
