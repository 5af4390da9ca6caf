// Semantic Fidelity: small UI behaviour for A1111 (gradio 3.41) and Forge (gradio 4).
// Tooltips of the controls come from guidance/params.py through the components themselves; this file
// only adds the accordion's own hint. Every host global is checked first: a missing one (another host
// version, another page) must not raise.
(function () {
    "use strict";

    var hint =
        "Make the image follow the prompt: concept steering, SEGA edits, S-CFG region scales and " +
        "attention regulation, all training-free. Off: the image is exactly what the WebUI makes without it.";

    if (typeof titles !== "undefined" && titles !== null && typeof titles === "object") {
        titles["Semantic Fidelity"] = hint;
    }

    // The header of our accordion gets the hint as its title once the UI exists.
    function titleAccordions() {
        var root = typeof gradioApp === "function" ? gradioApp() : document;
        if (!root || typeof root.querySelectorAll !== "function") {
            return;
        }
        var ids = ["script_txt2img_semantic_fidelity_enable", "script_img2img_semantic_fidelity_enable"];
        ids.forEach(function (id) {
            var accordion = root.querySelector("#" + id);
            var header = accordion && (accordion.querySelector(".label-wrap") || accordion.firstElementChild);
            if (header && !header.title) {
                header.title = hint;
            }
        });
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(titleAccordions);
    }
})();
