# Helpers shared by train.sh, finetune.sh, linprobe.sh, knn.sh, segment.sh and train_distributed.sh (sourced, not
# run).
#
# Paths: each launcher cds into the repository, where its own defaults (data/..., output/...) are relative. The
# paths the user gives (path variables set in the environment, path flags on the command line, positional weights
# and checkpoints) are relative to the folder the launcher was called from, LAUNCHER_CALLER_DIR (set by the first
# launcher before its cd): they are made absolute here before Python sees them. Paths inside a --config file are
# read by Python, relative to the repository: write them absolute.
#
# Precedence of a value, highest first:
#   1. a flag on the command line (--epochs 1, --epochs=1, or an abbreviation argparse accepts: --epo 1)
#   2. a positional argument of upstream's forms (train.sh <model> <attention> <loss>, finetune.sh <model> [weights],
#      knn.sh <checkpoint>...)
#   3. a variable set in the environment (EPOCHS=1 bash train.sh)
#   4. the values in --config FILE, when given
#   5. the launcher's default (the top of each launcher)
# A launcher passes a flag to Python only when that flag is not on the command line (so each flag reaches Python
# once, and list flags such as --checkpoints are never given twice), and checks a file only when that file is the
# one Python will read. With --config, the launcher's defaults are not passed (the file's values would lose to them);
# variables set in the environment and positional arguments still are.

EXPLICIT=" "      # names of the variables the user set (environment or positional argument), space separated
USER_ARGS=()      # the flags passed through to Python; set by the launcher after it has taken its positional arguments
PY_ARGS=()        # the launcher's own flags, built by pass_var
FLAG_VALUES=()    # the values of the last occurrence of the flag user_flag found

die() { echo "error: $*" >&2; exit 1; }

# -h / --help anywhere on the command line: the launcher's header (its variables and forms), then the entry script's
# flags, and nothing else: no check of weights or data that do not exist yet, no run, no closing evaluation.
launcher_help() {  # launcher_help LAUNCHER SCRIPT "$@"
  local launcher=$1 script=$2 arg
  shift 2
  for arg in "$@"; do
    if [[ $arg == -h || $arg == --help ]]; then
      sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$launcher"  # the comment block under the shebang line
      echo
      exec "${PYTHON:-python}" "$script" --help
    fi
  done
}

# The flags whose values are paths, and the variables that set them.
PATH_FLAGS=(train_path test_path output_dir log_dir finetune resume init band_stats config checkpoints knn_train_path
  knn_test_path palette)
var_flag() {
  case $1 in
    TRAIN_PATH) echo train_path ;; TEST_PATH) echo test_path ;; OUTPUT_DIR) echo output_dir ;; WEIGHTS) echo finetune ;;
    BAND_STATS) echo band_stats ;; PALETTE) echo palette ;; CHECKPOINTS) echo checkpoints ;;
  esac
}

# from_caller FLAG VALUE: VALUE made absolute against LAUNCHER_CALLER_DIR; absolute paths, "" and the words that are
# no path (--test_path split, --resume auto, --checkpoints none, --palette isprs / none) as given.
from_caller() {
  case "$1:$2" in
    *: | *:/* | test_path:split | resume:auto | checkpoints:none | palette:isprs | palette:none) printf '%s' "$2" ;;
    *) printf '%s/%s' "${LAUNCHER_CALLER_DIR:-$PWD}" "${2#./}" ;;
  esac
}

# absolute PATH: PATH as the launcher sees it, absolute (for messages: the repository is the current folder).
absolute() { if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$PWD" "${1#./}"; fi; }

# setvar NAME DEFAULT: keep NAME when the environment sets it (non-empty; recorded as the user's; a path made
# absolute by from_caller), else DEFAULT.
setvar() {
  if [[ -n ${!1:-} ]]; then
    mark_explicit "$1"
    local flag item items resolved=()
    flag=$(var_flag "$1")
    if [[ $flag == checkpoints ]]; then
      read -ra items <<<"${!1}"
      for item in "${items[@]}"; do resolved+=("$(from_caller "$flag" "$item")"); done
      printf -v "$1" '%s' "${resolved[*]}"
    elif [[ -n $flag ]]; then
      printf -v "$1" '%s' "$(from_caller "$flag" "${!1}")"
    fi
  else
    printf -v "$1" '%s' "$2"
  fi
}
mark_explicit() { EXPLICIT+="$1 "; }
is_explicit() { [[ $EXPLICIT == *" $1 "* ]]; }

# user_flag NAME [many]: whether USER_ARGS gives --NAME; FLAG_VALUES gets the values of its last occurrence
# (one value; with "many", every following argument up to the next flag, as argparse's nargs="+").
user_flag() {
  local name=$1 many=${2:-} i key found=1
  FLAG_VALUES=()
  for ((i = 0; i < ${#USER_ARGS[@]}; i++)); do
    local arg=${USER_ARGS[i]}
    [[ $arg == -- ]] && break
    [[ $arg == --?* ]] || continue
    key=${arg%%=*}
    key=${key#--}
    [[ -n $key && $name == "$key"* ]] || continue   # exact name or an abbreviation (argparse's allow_abbrev)
    found=0
    FLAG_VALUES=()
    if [[ $arg == *=* ]]; then
      FLAG_VALUES=("${arg#*=}")
    elif [[ -n $many ]]; then
      while ((i + 1 < ${#USER_ARGS[@]})) && [[ ${USER_ARGS[i + 1]} != -* ]]; do
        FLAG_VALUES+=("${USER_ARGS[i + 1]}")
        i=$((i + 1))
      done
    elif ((i + 1 < ${#USER_ARGS[@]})); then
      FLAG_VALUES=("${USER_ARGS[i + 1]}")
      i=$((i + 1))
    fi
  done
  return $found
}

# path_flag KEY: the path flag (PATH_FLAGS) that --KEY names, exactly or as the one abbreviation argparse accepts;
# fails for other flags.
path_flag() {
  local name matches=()
  for name in "${PATH_FLAGS[@]}"; do
    if [[ $name == "$1" ]]; then echo "$name"; return 0; fi
    if [[ $name == "$1"* ]]; then matches+=("$name"); fi
  done
  if ((${#matches[@]} == 1)); then echo "${matches[0]}"; return 0; fi
  return 1
}

# resolve_user_args: the values of USER_ARGS's path flags (--flag VALUE, --flag=VALUE, abbreviations; --checkpoints
# takes every value up to the next flag) made absolute by from_caller. Each launcher then passes
# "${USER_ARGS[@]}" as its arguments (set --).
resolve_user_args() {
  local i arg key flag
  for ((i = 0; i < ${#USER_ARGS[@]}; i++)); do
    arg=${USER_ARGS[i]}
    [[ $arg == -- ]] && break
    [[ $arg == --?* ]] || continue
    key=${arg%%=*}
    flag=$(path_flag "${key#--}") || continue
    if [[ $arg == *=* ]]; then
      USER_ARGS[i]="$key=$(from_caller "$flag" "${arg#*=}")"
    elif [[ $flag == checkpoints ]]; then
      while ((i + 1 < ${#USER_ARGS[@]})) && [[ ${USER_ARGS[i + 1]} != -* ]]; do
        i=$((i + 1))
        USER_ARGS[i]=$(from_caller "$flag" "${USER_ARGS[i]}")
      done
    elif ((i + 1 < ${#USER_ARGS[@]})); then
      i=$((i + 1))
      USER_ARGS[i]=$(from_caller "$flag" "${USER_ARGS[i]}")
    fi
  done
}

# launcher_value NAME: whether the launcher, not the user, decides the flag of variable NAME
# (false when --config is on the command line and the user did not set NAME).
launcher_value() { is_explicit "$1" || ! user_flag config; }

# pass_var FLAG NAME: add --FLAG "$NAME" to PY_ARGS unless the command line gives --FLAG, or --config decides it.
pass_var() {
  user_flag "$1" && return 0
  launcher_value "$2" || return 0
  PY_ARGS+=("--$1" "${!2}")
}


# select_data: DATA, the embedded sample a launcher runs on (set it in the environment; the one variable to switch):
#   sentinel2_rgb  data/sentinel2_rgb/, 8-bit RGB JPEG tiles (the default)
#   sentinel2_ms   data/sentinel2_ms/, the same tiles as 13-band uint16 GeoTIFFs at 20 m: adds --in_chans 13
#                  --band_stats data/sentinel2_ms/band_stats.json (and in train.sh / segment.sh --rgb_bands 3 2 1), and output
#                  folders ending in _ms, so RGB and multispectral runs never share one
# Sets DATA_SUFFIX ("" or _ms), TILE_SIZE (the sample's tile side in pixels), IN_CHANS / BAND_STATS / RGB_BANDS
# (empty for RGB: not passed) and TRAIN_SH, the command that
# makes this sample's pretraining checkpoint (for error messages).
select_data() {
  setvar DATA sentinel2_rgb
  case $DATA in
    sentinel2_rgb) DATA_SUFFIX= ; TILE_SIZE=128 ; setdata IN_CHANS "" ; setdata BAND_STATS "" ; setdata RGB_BANDS ""
                   TRAIN_SH="bash train.sh" ;;
    sentinel2_ms) DATA_SUFFIX=_ms ; TILE_SIZE=64 ; setdata IN_CHANS 13 ; setdata BAND_STATS data/sentinel2_ms/band_stats.json
                  setdata RGB_BANDS "3 2 1"  # B04 B03 B02: the figures of train.sh and segment.sh in true colour
                  TRAIN_SH="DATA=$DATA bash train.sh" ;;
    *) die "DATA=$DATA: the embedded samples are sentinel2_rgb and sentinel2_ms (other data: set TRAIN_PATH)" ;;
  esac
}

# setdata NAME DEFAULT: setvar for a variable whose default follows DATA; a DATA the user set counts as setting it
# (so with --config, DATA=sentinel2_ms still passes its paths and band flags).
setdata() {
  setvar "$1" "$2"
  if is_explicit DATA; then mark_explicit "$1"; fi
}

# pass_training_vars: the variables finetune.sh (linprobe.sh) and segment.sh share, as flags (each unless given).
pass_training_vars() {
  if [[ -n $MODEL ]]; then pass_var model MODEL; fi
  pass_var input_size INPUT_SIZE
  pass_var epochs EPOCHS
  pass_var warmup_epochs WARMUP_EPOCHS
  pass_var batch_size BATCH_SIZE
  pass_var blr BLR
  pass_var train_path TRAIN_PATH
  if [[ -n $TEST_PATH ]]; then pass_var test_path TEST_PATH; fi  # empty: Python's default (the sample's, for it)
  pass_var output_dir OUTPUT_DIR
  pass_var num_workers NUM_WORKERS
  pass_bands
}

# pass_rgb_bands: --rgb_bands RGB_BANDS (the bands figures show as R G B), where it is set (train.sh, segment.sh).
pass_rgb_bands() {
  if [[ -n $RGB_BANDS ]] && ! user_flag rgb_bands && launcher_value RGB_BANDS; then
    read -ra BANDS <<<"$RGB_BANDS"
    PY_ARGS+=(--rgb_bands "${BANDS[@]}")
  fi
}

# pass_bands: --in_chans / --band_stats of the sample (select_data), where it has them.
pass_bands() {
  if [[ -n $IN_CHANS ]]; then pass_var in_chans IN_CHANS; fi
  if [[ -n $BAND_STATS ]]; then pass_var band_stats BAND_STATS; fi
}

# pass_weights: the weights Python will read are --finetune on the command line, else WEIGHTS (passed unless
# --config decides); a missing file stops here, naming where it came from (WEIGHTS_FROM: empty = the default).
pass_weights() {
  if user_flag finetune; then
    WEIGHTS=${FLAG_VALUES[0]-}
    WEIGHTS_FROM=--finetune
  elif launcher_value WEIGHTS; then
    PY_ARGS+=(--finetune "$WEIGHTS")
  else
    WEIGHTS=
  fi
  if [[ -n $WEIGHTS && ! -f $WEIGHTS ]]; then
    if [[ -z $WEIGHTS_FROM ]]; then
      die "no weights at $(absolute "$WEIGHTS"): run '$TRAIN_SH' first, or give --finetune PATH / set WEIGHTS (published weights: weights/README.md)"
    fi
    die "no weights at $(absolute "$WEIGHTS") (from $WEIGHTS_FROM)"
  fi
}
