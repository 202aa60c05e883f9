"""The site script of the anchor benchmark (:mod:`benchmarks.anchor`): NVFlare's Client API, written plainly.

NVFlare's own FedAvg recipe (``nvflare.app_opt.pt.recipes.fedavg.FedAvgRecipe``) runs this file at every
simulated site. Each round it does what a medsilo FedAvg site does: receive the global model, score it on the
site's validation and test splits, train one local epoch (SGD, the job's batch size and learning rate) and send
the weights back with the number of steps as the averaging weight. Data and model are medsilo's (the same
synthetic hospital, the same ``cnn``), so the two engines do the same work and only the platform differs.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch import nn

from benchmarks.anchor_common import evaluate, site_data, train_epoch
from medsilo.medical.models import build_model


class AnchorCNN(nn.Module):
    """medsilo's ``cnn`` backbone and head, under a class NVFlare's persistor can rebuild from its arguments."""

    def __init__(self, num_classes: int = 2, feature_dim: int = 32, seed: int = 0):
        super().__init__()
        self.net = build_model("cnn", in_channels=1, num_classes=num_classes, feature_dim=feature_dim, seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main() -> None:
    import nvflare.client as flare

    parser = argparse.ArgumentParser()
    parser.add_argument("--sites-file", required=True)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--feature-dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("ANCHOR_THREADS", "1")))

    flare.init()
    site = flare.get_site_name()
    data = site_data(args.sites_file, site, args.image_size, args.seed)
    model = AnchorCNN(feature_dim=args.feature_dim, seed=args.seed)
    while flare.is_running():
        received = flare.receive()
        model.load_state_dict(received.params)
        val_acc, _ = evaluate(model, data.val), evaluate(model, data.test)
        steps = train_epoch(model, data.train, batch_size=args.batch_size, lr=args.lr, seed=args.seed + received.current_round)
        if os.environ.get("ANCHOR_METRICS"):  # the driver reads the last round's accuracies from here
            with open(os.environ["ANCHOR_METRICS"], "a") as out:
                out.write(json.dumps({"site": site, "round": received.current_round, "val_acc": val_acc}) + "\n")
        flare.send(flare.FLModel(params=model.state_dict(), metrics={"accuracy": val_acc},
                                 meta={"NUM_STEPS_CURRENT_ROUND": steps}))  # fmt: skip


if __name__ == "__main__":
    main()
