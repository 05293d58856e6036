from smallfirst.cli.main import main

# Guarded: a process that spawns children (the small pool's training process) has this module
# imported again in each child, where it must not start another command.
if __name__ == "__main__":
    main()
