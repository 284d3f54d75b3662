"""A stand-in for CUDA-graph training on the CPU (imported by tests and by their torchrun scripts)."""
import torch


def graph_like_call(model, x, t):
    """Stands in for ``torch.cuda.make_graphed_callables`` on the CPU, as far as gradients go:
    its backward writes the parameters' gradients into static buffers and returns them (a
    replay overwrites them), as a captured backward graph does."""
    params = list(model.parameters())
    buffers = [torch.zeros_like(p) for p in params]

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, t, *weights):
            ctx.inputs = x.detach(), t.detach()
            with torch.no_grad():
                return model(x, t)

        @staticmethod
        def backward(ctx, grad):
            with torch.enable_grad():
                grads = torch.autograd.grad(model(*ctx.inputs), params, grad)
            for buffer, g in zip(buffers, grads):
                buffer.copy_(g)
            return (None, None, *(buffer.detach() for buffer in buffers))

    def call(x, t):
        return Replay.apply(x, t, *params)

    call.buffers = buffers
    return call
