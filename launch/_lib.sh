# Helpers shared by the launchers in this folder. Sourced, never executed.
#
# Kept to bash 3.2 (macOS's /bin/bash), since TPU jobs are often launched from a
# laptop: no associative arrays, no `wait -n`, no `mapfile`, and an array that may be
# empty is expanded as ${a[@]+"${a[@]}"} because bash < 4.4 calls "${a[@]}" of an
# empty array an unbound variable under `set -u`.

# Name the launcher by the path it was run as, so messages read "launch/local.sh: ...".
PROG=${0}

# Root of the qwen-jax checkout this launcher belongs to.
# shellcheck disable=SC2034  # used by the launchers that source this file
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

# quote WORD: WORD as one shell word, by the rules of Python's shlex.quote (left bare
# when it is all safe characters, otherwise single-quoted). A leading `--flag=` or
# `NAME=` stays outside the quotes, so `--command='cd x && y'` and `A=1 cmd` read
# naturally; the shell parses both to the same word either way.
_SAFE_WORD='^[A-Za-z0-9_@%+=:,./-]+$'
_FLAG_PREFIX='^(--[A-Za-z0-9][A-Za-z0-9_.-]*=|[A-Za-z_][A-Za-z0-9_]*=)(.*)$'
quote() {
  local s=$1 prefix=
  if [[ -z $s ]]; then
    printf "''"
    return
  fi
  if [[ $s =~ $_SAFE_WORD ]]; then
    printf '%s' "$s"
    return
  fi
  if [[ $s =~ $_FLAG_PREFIX ]]; then
    prefix=${BASH_REMATCH[1]}
    s=${BASH_REMATCH[2]}
    if [[ -z $s || $s =~ $_SAFE_WORD ]]; then
      printf '%s%s' "$prefix" "$s"
      return
    fi
  fi
  local q="'\\''"   # end the quote, a backslash-escaped quote, reopen the quote
  printf "%s'%s'" "$prefix" "${s//\'/$q}"
}

# join_quoted WORD...: the words as one copy-pasteable command line (no newline).
join_quoted() {
  local out='' word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# run_or_print WORD...: with DRY_RUN=1 print the command line, otherwise run it.
run_or_print() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%s\n' "$(join_quoted "$@")"
  else
    "$@"
  fi
}

# remote_path PATH: PATH for a remote shell command line. A leading ~ or ~/ stays
# unquoted so that the remote shell expands it to the remote user's home.
remote_path() {
  # shellcheck disable=SC2088  # the tildes are meant literally here
  case $1 in
    "~") printf '~' ;;
    "~/"*) printf '~/%s' "$(quote "${1#\~/}")" ;;
    *) quote "$1" ;;
  esac
}

# Option parsing. Valued options are spelled --name=value only; these catch the rest.
#   value_of ARG: the value of a --name=value argument.
#   no_value ARG: die because ARG (a valued option) came without "=value".
value_of() { printf '%s' "${1#*=}"; }
no_value() { die "$1 needs a value: write $1=VALUE"; }

# require VALUE FLAG: die naming FLAG when VALUE is empty.
require() {
  [[ -n $1 ]] || die "$2 is required"
}

# require_positive_int VALUE FLAG
require_positive_int() {
  [[ $1 =~ ^[1-9][0-9]*$ ]] || die "$2 must be a positive integer, got '$1'"
}

# require_path_workdir WORKDIR: qwen-jax reads and writes WORKDIR through the file system, so a
# bucket URL will not do: on a pod every host mounts the same storage (Cloud Storage FUSE, NFS).
require_path_workdir() {
  case $1 in
    *://*) die "--workdir=$1 is a URL, but qwen-jax writes its workdir through the file system: mount the bucket on every host (Cloud Storage FUSE) and give the mount's path, e.g. --workdir=/gcs/${1#*://}" ;;
  esac
}
