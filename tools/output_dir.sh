# shellcheck shell=sh
# Sourced by tools/train_bg.sh and tools/slurm_train.sh: the OUTPUT_DIR given to train_net.py.

# Prints the value after the last OUTPUT_DIR key of the arguments (empty when there is none), as train_net.py
# would read it.
output_dir_of() {
    found=""
    previous=""
    for argument in "$@"; do
        [ "$previous" = OUTPUT_DIR ] && found=$argument
        previous=$argument
    done
    printf '%s' "$found"
}
