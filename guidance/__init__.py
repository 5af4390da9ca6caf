"""Semantic Fidelity: training-free prompt-following guidance for the Stable Diffusion WebUI.

Importing this package is cheap on purpose: no torch model, no spaCy pipeline and no host module
is loaded here. The WebUI script imports submodules as it needs them.
"""

__version__ = "0.1.0"

# The WebUI puts the extension root on sys.path, and a PyPI package named ``guidance`` exists too.
# The script checks this marker to be sure it imported the extension's own package.
EXTENSION_MARKER = "semantic-fidelity"
