"""Run a method file's unmodified main() and record, at every step, what the step saw; used by
test_mechanisms.py to pin the EMA / momentum order and the queue order on the real training loop.

    python tests/capture_steps.py OUT.pt MODULE CLASS LOSS [script flags...]

MODULE.CLASS.forward and MODULE.LOSS are wrapped (the originals still run). Each forward call records the
model's parameters and buffers as they are when the step's forward starts (after any momentum update that
precedes it), the global RNG state then (MoCo's shuffle draws from it) and the views; each loss call records
its arguments (MoCo's queue as the loss reads it). The list of records is saved to OUT.pt at the end.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _copy(v):
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


def main():
    out, module_name, class_name, loss_name, *flags = sys.argv[1:]
    module = __import__(module_name)
    cls, loss_fn, records = getattr(module, class_name), getattr(module, loss_name), []
    forward = cls.forward

    def recording_forward(self, *views):
        records.append(
            {
                "params": {n: _copy(p) for n, p in self.named_parameters()},
                "buffers": {n: _copy(b) for n, b in self.named_buffers()},
                "rng": torch.get_rng_state(),
                "views": [_copy(x) for x in views],
            }
        )
        return forward(self, *views)

    def recording_loss(*args):
        records[-1]["loss_args"] = [_copy(a) for a in args]
        return loss_fn(*args)

    cls.forward = recording_forward
    setattr(module, loss_name, recording_loss)
    sys.argv = [f"{module_name}.py", *flags]
    try:
        module.run(module.main)
    finally:
        torch.save(records, out)


if __name__ == "__main__":
    main()
