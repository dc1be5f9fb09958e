"""The networks of docs/model.md as plain data (no torch needed), shared by the PyTorch
implementation and the numpy twin in check_cases.py."""


# The layer lists of docs/model.md, as (kind, args); the index in the list is the index in the
# parameter names (layers.<i>.weight), as in backei's NetworkSpec.
def _block(cin, cout, k, p, dropout=None):
    layers = [("conv", (cin, cout, k, p)), ("backei", (cout,))]
    if dropout is not None:
        layers.append(("dropout", (dropout,)))
    layers.append(("pool", ()))
    return layers


def network_layers(name):
    """(layer list, radius, input shape) of the networks of docs/model.md."""
    if name == "mnist":
        layers = _block(1, 15, 5, 0) + _block(15, 40, 5, 0) + [
            ("flatten", ()), ("linear", (640, 300)), ("spiking", ()),
            ("linear", (300, 10)), ("spiking", ())]
        return layers, 2, (1, 28, 28)
    if name == "fashion-mnist":
        layers = _block(1, 32, 5, 2) + _block(32, 64, 5, 2) + [
            ("flatten", ()), ("linear", (3136, 1024)), ("spiking", ()),
            ("linear", (1024, 10)), ("spiking", ())]
        return layers, 1, (1, 28, 28)
    if name == "cifar10":
        layers = (_block(3, 128, 3, 1, 0.5) + _block(128, 256, 3, 1, 0.5)
                  + _block(256, 512, 3, 1, 0.5) + [
                      ("flatten", ()), ("linear", (8192, 1024)), ("spiking", ()),
                      ("dropout", (0.5,)), ("linear", (1024, 10)), ("spiking", ())])
        return layers, 1, (3, 32, 32)
    raise ValueError(f"unknown network {name!r}: expected mnist, fashion-mnist or cifar10")


def spiking_layer_inputs(name):
    """[C, H, W] of the first and second BackEI layers of a network (for the layer workloads)."""
    spec, radius, (c, h, w) = network_layers(name)
    shapes = []
    for kind, args in spec:
        if kind == "conv":
            cin, c, k, p = args
            h, w = h + 2 * p - k + 1, w + 2 * p - k + 1
        elif kind == "pool":
            h, w = h // 2, w // 2
        elif kind == "backei":
            shapes.append((c, h, w))
    return shapes[0], shapes[1], radius
