// Semantic Fidelity: small UI behaviour. Tooltips of the controls come from guidance/params.py
// through the components themselves; this file only adds the accordion's own hint.
(function () {
    if (typeof titles === "undefined") {
        return;
    }
    titles["Semantic Fidelity"] =
        "Make the image follow the prompt: concept steering, SEGA edits, S-CFG region scales and " +
        "attention regulation, all training-free. Off: the image is exactly what the WebUI makes without it.";
})();
