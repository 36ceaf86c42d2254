"""Tensor ops beneath the layers of soma_lightning/nn, laid out as in flash-linear-attention: ops (functions
of tensors) -> layers (the nn.Modules beside this package) -> the model. Every fast form of an op has a plain
reference next to it, and the tests hold the fast forms to it.

    attention/reference.py       float32 softmax attention: the reference of every attention path
    attention/masks.py           which keys a query sees, as composable mask functions
    attention/flex.py            FlexAttention: the block mask, global keys in front, tuned tiles
    attention/structure_bias.py  the learned tree-distance bias, dense and as a FlexAttention score_mod
    attention/structure_grad.py  the bias table's gradient as one Triton kernel
    attention/backends.py        reference, SDPA, Flex and auto: GroupedQueryAttention's ways to attend
    slot_gather.py               rows gathered by index, opaque to torch.compile (graph attention's slots)
    delta_rule/                  the gated delta rule: naive recurrence, chunked PyTorch, fla dispatch
"""
