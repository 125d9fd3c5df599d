"""The three data backends, each a ``loaders.base.BaseLoader`` (the contract): ``torch_loader`` (a
torch DataLoader: OpenCV in workers, or nvJPEG), ``dali_loader`` + ``dali_pipeline`` (NVIDIA DALI, GPU or
CPU), ``ffcv_loader`` (FFCV .beton files). ``loaders.build`` imports one only when it is built: DALI and
FFCV are optional."""
