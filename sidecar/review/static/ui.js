// Keyboard shortcuts of the review page. Everything also works with the mouse and without
// this script: rows are links, decisions are plain form buttons.
(function () {
  "use strict";
  function typing(target) {
    var tag = target && target.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || (target && target.isContentEditable);
  }

  function queuePage() {
    var rows = Array.prototype.slice.call(document.querySelectorAll("#queue tbody tr[data-href]"));
    var index = rows.length ? 0 : -1;
    function select(i) {
      if (!rows.length) return;
      index = Math.max(0, Math.min(rows.length - 1, i));
      rows.forEach(function (row, n) { row.classList.toggle("selected", n === index); });
      rows[index].scrollIntoView({ block: "nearest" });
    }
    rows.forEach(function (row, n) {
      row.addEventListener("click", function (event) {
        if (event.target.tagName === "A") return;
        window.location.href = row.getAttribute("data-href");
      });
      row.addEventListener("mouseenter", function () { select(n); });
    });
    select(0);
    document.addEventListener("keydown", function (event) {
      if (typing(event.target) || event.ctrlKey || event.metaKey || event.altKey) return;
      if (event.key === "j") { select(index + 1); event.preventDefault(); }
      else if (event.key === "k") { select(index - 1); event.preventDefault(); }
      else if ((event.key === "Enter" || event.key === "o") && index >= 0) {
        window.location.href = rows[index].getAttribute("data-href");
        event.preventDefault();
      }
    });
  }

  function itemPage() {
    var answer = document.getElementById("answer");
    var override = document.getElementById("override");
    document.addEventListener("keydown", function (event) {
      if (event.target === answer && event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        override.click();
        event.preventDefault();
        return;
      }
      if (event.key === "Escape" && typing(event.target)) { event.target.blur(); return; }
      if (typing(event.target) || event.ctrlKey || event.metaKey || event.altKey) return;
      var link = null;
      if (event.key === "j") link = document.getElementById("next-item");
      else if (event.key === "k") link = document.getElementById("prev-item");
      else if (event.key === "q" || event.key === "u") link = document.getElementById("back");
      if (link) { window.location.href = link.getAttribute("href"); event.preventDefault(); return; }
      if (event.key === "o" && answer) {
        answer.focus();
        answer.select();
        event.preventDefault();
        return;
      }
      var button = document.querySelector('button[data-key="' + event.key + '"]');
      if (button && event.key !== "o") { button.click(); event.preventDefault(); }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var page = document.body.getAttribute("data-page");
    if (page === "queue") queuePage();
    if (page === "item") itemPage();
  });
})();
