package topology

import (
	"context"
	"fmt"
	"os"
)

// A service address moves with a migrated process between two hosts: it
// is a /32 on the loopback of the host that has the process, and the
// client host reaches it through a route via that host, as through a load
// balancer. WriteMoveScript writes the phaul action script that moves it.

// PlaceService puts the service address vip on host at (removing it from
// the others of hosts) and routes client's traffic for it via at.
func PlaceService(ctx context.Context, vip string, client, at *Host, hosts ...*Host) error {
	for _, h := range hosts {
		if h != at {
			_ = ip(ctx, "-n", h.NS, "addr", "del", vip+"/32", "dev", "lo")
		}
	}
	if err := ip(ctx, "-n", at.NS, "addr", "replace", vip+"/32", "dev", "lo"); err != nil {
		return err
	}
	return ip(ctx, "-n", client.NS, "route", "replace", vip+"/32", "via", at.Addr)
}

// moveScript takes the log, the service address, the client's namespace
// and the source's and target's addresses. The target takes the address
// at network-lock and points the client's route at itself; the source
// gives it up after the dump. A rollback on either side undoes that
// side's part. Each run logs "SIDE ACTION pid=... addrs=..." first.
const moveScript = `#!/bin/sh
# The service address follows the migrated process.
echo "$PHAUL_SIDE $PHAUL_ACTION pid=$PHAUL_PID id=$PHAUL_MIGRATION_ID addrs=$PHAUL_ADDRESSES" >> %[1]s
set -e
case "$PHAUL_SIDE/$PHAUL_ACTION" in
source/post-dump)
	ip addr del %[2]s/32 dev lo ;;
source/rollback)
	ip addr replace %[2]s/32 dev lo
	ip -n %[3]s route replace %[2]s/32 via %[4]s ;;
target/network-lock)
	ip addr replace %[2]s/32 dev lo
	ip -n %[3]s route replace %[2]s/32 via %[5]s ;;
target/rollback)
	ip addr del %[2]s/32 dev lo 2>/dev/null || true ;;
esac
`

// WriteMoveScript writes to path the action script (for both phaul
// migrate on src and phaul serve on tgt) that moves vip from src to tgt,
// logging each run to log.
func WriteMoveScript(path, log, vip string, client, src, tgt *Host) error {
	body := fmt.Sprintf(moveScript, log, vip, client.NS, src.Addr, tgt.Addr)
	return os.WriteFile(path, []byte(body), 0o755)
}
