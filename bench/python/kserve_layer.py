"""A KServe Python model server that serves one MoGE layer with eager PyTorch.

It is the baseline for the end-to-end benchmark: the same checkpoint layer and
the same KServe v2 protocol as the moge-serve gateway, so that moge-load
drives both the same way. The layer code is torch_layer.moge_layer. The model
accepts one FP32 input `[T, H]`, ignores request parameters such as `layer`,
and returns `output` as FP32.

Usage: python kserve_layer.py --checkpoint DIR [--layer 0] [--grpc-port 9081] [--http-port 9080] [--threads N]
"""

import argparse
import os

import torch
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

from torch_layer import load_layer, moge_layer


class MogeLayer(Model):
    """One layer of a moge-serve checkpoint as a KServe v2 model."""

    def __init__(self, name: str, checkpoint: str, layer: int, dtype: torch.dtype):
        super().__init__(name)
        self.config, self.weights = load_layer(checkpoint, layer, dtype)
        self.dtype = dtype
        self.hidden_size = self.config["hidden_size"]
        self.ready = True

    def get_input_types(self):
        return [{"name": "hidden_states", "datatype": "FP32", "shape": [-1, self.hidden_size]}]

    def get_output_types(self):
        return [{"name": "output", "datatype": "FP32", "shape": [-1, self.hidden_size]}]

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        hidden = payload.inputs[0].as_numpy()
        with torch.inference_mode():
            output = moge_layer(torch.from_numpy(hidden), self.weights, self.config, self.dtype).numpy()
        tensor = InferOutput(name="output", shape=list(output.shape), datatype="FP32")
        tensor.set_data_from_numpy(output, binary_data=True)
        return InferResponse(model_name=self.name, infer_outputs=[tensor], response_id=payload.id)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--model-name", default="moge")
    parser.add_argument("--grpc-port", type=int, default=9081)
    parser.add_argument("--http-port", type=int, default=9080)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                        help="compute dtype of the experts; bfloat16 reads the stored weights as moge-serve does")
    args, _ = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    model = MogeLayer(args.model_name, args.checkpoint, args.layer, getattr(torch, args.dtype))
    ModelServer(grpc_port=args.grpc_port, http_port=args.http_port, workers=1).start([model])


if __name__ == "__main__":
    main()
