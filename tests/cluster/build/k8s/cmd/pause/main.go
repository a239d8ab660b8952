// pause is the sandbox container of every pod on the local node: it holds the pod's
// namespaces, reaps orphaned children (it is PID 1 when the pod shares its PID namespace)
// and exits on SIGINT/SIGTERM. Kubernetes' own pause is C (build/pause in its repository,
// not in the Go module), so the node builds this equivalent from the same wrapper module.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
