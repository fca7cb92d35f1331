"""Train with a hook of your own: python train_with_hook.py --config-file config/digits.yaml [KEY VALUE ...]"""

import sys

from engine import HookBase
from ptengine.tools.train_net import main


class PrintEveryEpoch(HookBase):
    """Runs inside the training loop; self.trainer is the running trainer (see engine/hooks.py)."""

    def after_epoch(self):
        accuracy = (self.trainer.latest_eval or {}).get("val_acc1", float("nan"))
        print(f"my hook: epoch {self.trainer.epoch + 1} ended at iteration {self.trainer.iter}, "
              f"val_acc1 {accuracy:.3f}")


if __name__ == "__main__":
    # Same arguments as tools/train_net.py. A loss of your own: main(hooks=[...], loss=my_loss), where
    # my_loss(logits, targets) returns the loss summed over the batch, e.g. CrossEntropyLoss(reduction="sum").
    sys.exit(main(hooks=[PrintEveryEpoch()]))
