// Command etcd is etcd's own main, built at the etcd version that k8s.io/kubernetes
// pins, so the control plane needs nothing beyond the Go module proxy.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
