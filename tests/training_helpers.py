"""Training test helpers, imported by tests and by the torchrun scripts they run."""
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


def three_steps(trainer, rank: int, batch: int = 2, size: int = 8):
    """Three train steps on batches of the rank's own: the losses, the first step's (averaged)
    gradient before AdamW moved anything, and the weights after."""
    torch.manual_seed(1 + rank)
    losses, first_grads = [], None
    for _ in range(3):
        losses.append(float(trainer.train_step(torch.rand(batch, 3, size, size) * 2 - 1)["loss"]))
        if first_grads is None:
            first_grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
    return losses, first_grads, torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
