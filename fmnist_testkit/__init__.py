"""What the tests, the benchmarks and the image's smoke test share: starting and stopping the two servers
(`servers`), the environment their child processes get (`harness.child_env`), images encoded as the JSON
contract carries them and the requests built from them (`images`), and casual phone photos of test images
(`photos`). Installed with the project (`pip install -e ".[dev]"`, as `make install` does); the product
never imports it. Nothing here imports torch.
"""
