"""The examples each command's --help ends with: commands a user can paste, with the data in data/mnist."""

D = "data/mnist"
EPILOGS = {
    "ebm": f"""examples:
  python -m training ebm --objective eqm --conditional --data-dir {D} --out checkpoints/my_eqm.safetensors
  python -m training ebm --data-dir {D} --epochs 3 --out checkpoints/my_ebm.safetensors   # contrastive divergence
  python -m training ebm --dataset toy2d:moons --epochs 2 --out /tmp/moons.safetensors     # 2-D toy data, no files
  python -m training ebm --objective eqm --conditional --dataset folder --data-dir pets   # pets/train/<class>/*.png
""",
    "gan": f"""examples:
  python -m training gan --loss wgan-gp --width 32 --data-dir {D} --epochs 10 --out checkpoints/my_wgan.safetensors
  python -m training gan --loss dcgan --data-dir {D} --epochs 1 --max-batches 50 --out /tmp/quick.safetensors
  python -m training gan --dataset folder --data-dir pets --image-size 64 --out checkpoints/pets_gan.safetensors
""",
    "flow": f"""examples:
  python -m training flow --arch nice --hidden 300 --depth 4 --data-dir {D} --out checkpoints/my_nice.safetensors
  python -m training flow --arch glow --levels 2 --steps 6 --hidden 64 --data-dir {D} --resume   # continue a run
  python -m training flow --arch glow --dataset folder --data-dir pets --out checkpoints/pets_glow.safetensors
  python -m training flow --arch cnf --conditional --lr 2e-3 --data-dir {D} --out checkpoints/my_cnf.safetensors
""",
    "sample": """examples:
  python -m training sample checkpoints/eqm_mnist.safetensors --n 64 --trajectory 4 --out digits.png
  python -m training sample checkpoints/eqm_mnist.safetensors --label all --n 100 --out classes.png
  python -m training sample checkpoints/ebm_mnist_seed0.safetensors --state-dir state --out from_server.png
  python -m training sample checkpoints/ebm_mnist_seed{0,1,2}.safetensors --init buffer --out ensemble.png
""",
    "evaluate": f"""examples:
  python -m training evaluate checkpoints/eqm_mnist.safetensors --data-dir {D}
  python -m training evaluate checkpoints/glow_mnist.safetensors --data-dir {D} --n 500 --record
  python -m training evaluate checkpoints/eqm_mnist.safetensors --data-dir {D} --label all --guidance 1.5
""",
    "export": """examples:
  python -m training export checkpoints/eqm_mnist.safetensors --out exported/eqm_copy.pt2   # and eqm_copy.json
  python -m training export checkpoints/glow_mnist.safetensors --out /tmp/glow.pt2
""",
    "classifier": f"""example:
  python -m training classifier --data-dir {D}     # rewrites training/assets/mnist_classifier.safetensors
  python -m training classifier --data-dir {D} --arch strided_classifier --seed 1   # the second: ..._strided_...
  python -m training classifier --dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist
""",
    "zoo": """examples:
  python -m training zoo --dry-run                                   # what each model's next chunk runs
  python -m training zoo --jobs 2 --data-dir data/mnist              # a chunk of every model, two at a time
  python -m training zoo --preset cuda --only dcgan_mnist --ship     # a lent GPU: one model per command
  bash scripts/train_zoo.sh --only glow_mnist,nice_mnist             # the same as python -m training zoo
""",
    "set-sampler": """examples:
  python -m training set-sampler checkpoints/dcgan_mnist.safetensors steps=50 step_size=0.001 noise=0.0447
  python -m training set-sampler checkpoints/glow_mnist.safetensors temperature=0.6
  python -m training set-sampler checkpoints/ebm_mnist_seed0.safetensors steps=100 init=buffer
""",
    "fetch-data": """examples:
  python -m training fetch-data mnist                                  # into data/mnist
  python -m training fetch-data fashion-mnist --dir ~/data/fashion
  python -m training fetch-data mnist --mirror http://mirror.internal/mnist/    # behind a firewall
  python -m training fetch-data mnist --mirror file:///media/usb/mnist/        # files carried in by hand
""",
}
