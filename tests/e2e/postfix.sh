# Private Postfix instances for the end-to-end suite and the demo (sourced). Each instance has
# its own config, queue and log under $E2E_WORK/postfix-<name>, listens only on the loopback
# address it is given, never on port 25, and never becomes the system MTA.
#
#   e2e_postfix_up <name> <ip> <port> <extra main.cf lines>
#   e2e_postfix_down <name>
#   e2e_postfix_log <name>          path of its log file
#   e2e_postfix_wait_log <name> <regex> [seconds]

e2e_postfix_up() {
  local name=$1 ip=$2 port=$3 extra=$4
  local d=$E2E_WORK/postfix-$name
  mkdir -p "$d/conf" "$d/queue" "$d/data"
  chown postfix "$d/data"
  cp /etc/postfix/master.cf "$d/conf/master.cf"
  # Our one smtpd listener replaces the default port 25 one.
  sed -i -E "s/^smtp +inet .*/$ip:$port inet n - n - - smtpd/" "$d/conf/master.cf"
  cat >"$d/conf/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $d/queue
data_directory = $d/data
maillog_file = $d/maillog
maillog_file_prefixes = $d
myhostname = $name.postfix.test
mydestination =
# The listener address is fixed in master.cf; "all" only avoids Postfix's check that the
# address is configured on an interface (127.0.0.x is routed to lo without being listed).
inet_interfaces = all
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
smtpd_tls_loglevel = 1
smtp_tls_loglevel = 1
$extra
CF
  postfix -c "$d/conf" start >/dev/null 2>&1 || {
    cat "$d/maillog" >&2 2>/dev/null
    return 1
  }
  local i
  for i in $(seq 50); do
    (echo >"/dev/tcp/$ip/$port") 2>/dev/null && return 0
    sleep 0.2
  done
  echo "postfix $name did not start listening on $ip:$port" >&2
  return 1
}

e2e_postfix_down() {
  local d=$E2E_WORK/postfix-$1
  [ -d "$d/conf" ] && postfix -c "$d/conf" stop >/dev/null 2>&1 || true
}

e2e_postfix_log() { echo "$E2E_WORK/postfix-$1/maillog"; }

e2e_postfix_wait_log() {
  local log=$E2E_WORK/postfix-$1/maillog i
  for i in $(seq $((${3:-30} * 5))); do
    grep -qE -- "$2" "$log" 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}
