"""The scale bench's job under Flower's simulation (Ray backend): FedAvg over every client each round.

Run by ``bench/scale.py --flower-python PATH`` with that interpreter (Flower pins its own protobuf,
so it lives in its own environment), never imported by dimat. The clients train exactly what
dimat's peers train in ``bench/scale.py``: the same 1-D CNN (``dimat.models.cnn1d``), the same
per-peer training data (written by dimat into ``--data``), SGD with the same hyper-parameters,
``--epochs`` local epochs, a fresh optimizer each round (as dimat's peers with
``merge.keep_momentum=false``), batches drawn from a per-client seeded permutation. The server
evaluates the global model on the test set after every round (Flower's usual centralised
evaluation; dimat evaluates a sample of its N models). Writes the round end times to ``--out``.

    python bench/flower_job.py --data job.npz --rounds 3 --out flower.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from dimat.models.cnn1d import cnn1d

    job = np.load(args.data)
    n = int(job["num_peers"])
    hp = json.loads(str(job["hparams"]))
    x_test, y_test = torch.from_numpy(job["x_test"]), torch.from_numpy(job["y_test"])

    def model() -> torch.nn.Module:
        torch.manual_seed(int(hp["seed"]))
        return cnn1d(num_classes=int(hp["num_classes"]), input_shape=tuple(hp["input_shape"]))

    def get(m: torch.nn.Module) -> list[np.ndarray]:
        return [v.detach().cpu().numpy() for v in m.state_dict().values()]

    def put(m: torch.nn.Module, arrays: list[np.ndarray]) -> None:
        m.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in zip(m.state_dict(), arrays)})

    class Client(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid
            self.x = torch.from_numpy(job[f"x_{pid}"])
            self.y = torch.from_numpy(job[f"y_{pid}"])

        def fit(self, parameters, config):  # noqa: ANN001 (Flower's signature)
            torch.set_num_threads(1)
            m = model()
            put(m, parameters)
            m.train()
            opt = torch.optim.SGD(m.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
            gen = torch.Generator().manual_seed(int(hp["seed"]) * 7 + self.pid + 1000 * int(config.get("round", 0)))
            bs = int(hp["batch_size"])
            steps = max(1, round(args.epochs * -(-len(self.y) // bs)))
            order = torch.randperm(len(self.y), generator=gen)
            for s in range(steps):
                idx = order[(s * bs) % len(self.y):][:bs]
                opt.zero_grad()
                F.cross_entropy(m(self.x[idx]), self.y[idx]).backward()
                opt.step()
            return get(m), len(self.y), {}

    ends: list[float] = []

    def evaluate(server_round: int, parameters, config):  # noqa: ANN001
        m = model()
        put(m, parameters)
        m.eval()
        with torch.no_grad():
            out = m(x_test)
            acc = float((out.argmax(1) == y_test).float().mean())
        ends.append(time.perf_counter())
        return float(F.cross_entropy(out, y_test)), {"acc": acc}

    def client_fn(context: Context):
        return Client(int(context.node_config["partition-id"])).to_client()

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                          initial_parameters=ndarrays_to_parameters(get(model())), evaluate_fn=evaluate,
                          on_fit_config_fn=lambda r: {"round": r})
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    t0 = time.perf_counter()
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=n, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                                     "init_args": {"num_cpus": args.cpus}})
    import flwr

    # ends[0] is the initial evaluation (round 0), then one per round
    Path(args.out).write_text(json.dumps({"n": n, "round_ends": [e - t0 for e in ends],
                                          "total_s": time.perf_counter() - t0, "flwr": flwr.__version__}))


if __name__ == "__main__":
    main()
