from training.commands.cli import main

main()
