"""servekit's worker core: the code that runs inside a serving runtime, shipped as this one folder in every archive.

It imports only torch, torchvision, Pillow, numpy (torchvision requires it) and the standard library (onnxruntime when
an ONNX model loads, TorchServe's `ts` in its adapter alone), never `servekit`: servekit's library imports its facts
from here instead. One concern a module, lowest first:

    errors            RequestError: a client's mistake, answered with its own status
    requests          Request and Answer as any runtime hands them over; bodies, JSON, limits; the plain protocol
    kserve            KServe v1 and v2 as protocol objects (decode, encode, error_body) and their envelopes
    answers           a classifier's answer, written from logits and read back by the library
    tensors           the dtypes servekit names; numbers from JSON and packed bytes as tensors
    vision            images from bytes (Pillow, limits, EXIF) and batched JPEG decode (nvJPEG on CUDA)
    settings          the archive's handler settings and their defaults
    loading           one registry of model formats (file, loader, layout rules) and the device rules
    acceleration      pinned copies, channels_last, CUDA graphs
    telemetry         metrics, answer headers and the batch log line as observers of a batch; profiling
    architectures     the model definitions every archive ships (and servekit trains)
    base              ServekitHandler (the batch loop, start-up in named steps) and ClassifierHandler
    digits, image_classifier, text_classifier, tensor_handler   the handlers of the models servekit serves
    torchserve        TorchServeHandler: TorchServe's worker API on any of them
"""
