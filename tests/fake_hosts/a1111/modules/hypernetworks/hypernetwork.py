"""`modules.hypernetworks.hypernetwork.apply_hypernetworks`: separate contexts for k and v, each
hypernetwork adding its own transform; with none loaded, the context itself for both."""


def apply_hypernetworks(hypernetworks, context, layer=None):
    context_k, context_v = context, context
    for hypernetwork in hypernetworks:
        context_k, context_v = hypernetwork(context_k), hypernetwork(context_v)
    return context_k, context_v
