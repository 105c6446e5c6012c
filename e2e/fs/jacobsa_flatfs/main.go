// jacobsa-flatfs: a one-directory, in-memory file system on jacobsa/fuse, for
// the compatibility matrix (e2e/matrix/catalogue.py).
//
// Usage: jacobsa-flatfs MOUNTPOINT
//
// It serves a root directory, mode 0777, that holds one file, "hello"
// (HelloText), and takes new regular files. The content exists before the
// mount does: the matrix reads it as soon as the mount shows up. jacobsa/fuse
// always mounts with default_permissions, so the modes are what let another
// uid in. It exits when the mount goes away (fusermount3 -u).
//
// scripts/build_fuse_examples.sh builds it against Debian's
// golang-github-jacobsa-fuse-dev in GOPATH mode.
package main

import (
	"fmt"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/jacobsa/fuse"
	"github.com/jacobsa/fuse/fuseops"
	"github.com/jacobsa/fuse/fuseutil"
	"golang.org/x/net/context"
)

const HelloText = "Hello from jacobsa/fuse!\n"

type file struct {
	name string
	data []byte
}

type flatFS struct {
	fuseutil.NotImplementedFileSystem

	mu    sync.Mutex
	uid   uint32
	gid   uint32
	files map[fuseops.InodeID]*file // every inode but the root
	next  fuseops.InodeID
}

func (fs *flatFS) attributes(inode fuseops.InodeID) (fuseops.InodeAttributes, bool) {
	now := time.Now()
	attrs := fuseops.InodeAttributes{Uid: fs.uid, Gid: fs.gid, Atime: now, Mtime: now, Ctime: now}
	if inode == fuseops.RootInodeID {
		attrs.Mode = os.ModeDir | 0777
		attrs.Nlink = 2
		return attrs, true
	}
	f, ok := fs.files[inode]
	if !ok {
		return attrs, false
	}
	attrs.Mode = 0666
	attrs.Nlink = 1
	attrs.Size = uint64(len(f.data))
	return attrs, true
}

func (fs *flatFS) entry(inode fuseops.InodeID) fuseops.ChildInodeEntry {
	attrs, _ := fs.attributes(inode)
	return fuseops.ChildInodeEntry{Child: inode, Attributes: attrs}
}

func (fs *flatFS) LookUpInode(_ context.Context, op *fuseops.LookUpInodeOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if op.Parent != fuseops.RootInodeID {
		return fuse.ENOENT
	}
	for inode, f := range fs.files {
		if f.name == op.Name {
			op.Entry = fs.entry(inode)
			return nil
		}
	}
	return fuse.ENOENT
}

func (fs *flatFS) GetInodeAttributes(_ context.Context, op *fuseops.GetInodeAttributesOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	attrs, ok := fs.attributes(op.Inode)
	if !ok {
		return fuse.ENOENT
	}
	op.Attributes = attrs
	return nil
}

// SetInodeAttributes takes truncation (a shell's ">" opens with O_TRUNC); it
// ignores mode and time changes.
func (fs *flatFS) SetInodeAttributes(_ context.Context, op *fuseops.SetInodeAttributesOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	f, ok := fs.files[op.Inode]
	if op.Size != nil && ok {
		size := int(*op.Size)
		if size <= len(f.data) {
			f.data = f.data[:size]
		} else {
			f.data = append(f.data, make([]byte, size-len(f.data))...)
		}
	}
	attrs, found := fs.attributes(op.Inode)
	if !found {
		return fuse.ENOENT
	}
	op.Attributes = attrs
	return nil
}

func (fs *flatFS) ForgetInode(context.Context, *fuseops.ForgetInodeOp) error { return nil }

func (fs *flatFS) CreateFile(_ context.Context, op *fuseops.CreateFileOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if op.Parent != fuseops.RootInodeID {
		return fuse.ENOENT
	}
	for _, f := range fs.files {
		if f.name == op.Name {
			return fuse.EEXIST
		}
	}
	inode := fs.next
	fs.next++
	fs.files[inode] = &file{name: op.Name}
	op.Entry = fs.entry(inode)
	return nil
}

func (fs *flatFS) OpenDir(_ context.Context, op *fuseops.OpenDirOp) error {
	if op.Inode != fuseops.RootInodeID {
		return fuse.ENOTDIR
	}
	return nil
}

func (fs *flatFS) ReadDir(_ context.Context, op *fuseops.ReadDirOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	inodes := make([]fuseops.InodeID, 0, len(fs.files))
	for inode := range fs.files {
		inodes = append(inodes, inode)
	}
	sort.Slice(inodes, func(i, j int) bool { return inodes[i] < inodes[j] })
	for i := int(op.Offset); i < len(inodes); i++ {
		dirent := fuseutil.Dirent{
			Offset: fuseops.DirOffset(i + 1),
			Inode:  inodes[i],
			Name:   fs.files[inodes[i]].name,
			Type:   fuseutil.DT_File,
		}
		n := fuseutil.WriteDirent(op.Dst[op.BytesRead:], dirent)
		if n == 0 {
			break
		}
		op.BytesRead += n
	}
	return nil
}

func (fs *flatFS) ReleaseDirHandle(context.Context, *fuseops.ReleaseDirHandleOp) error {
	return nil
}

func (fs *flatFS) OpenFile(_ context.Context, op *fuseops.OpenFileOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if _, ok := fs.files[op.Inode]; !ok {
		return fuse.ENOENT
	}
	return nil
}

func (fs *flatFS) ReadFile(_ context.Context, op *fuseops.ReadFileOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	f, ok := fs.files[op.Inode]
	if !ok {
		return fuse.ENOENT
	}
	if op.Offset < int64(len(f.data)) {
		op.BytesRead = copy(op.Dst, f.data[op.Offset:])
	}
	return nil
}

func (fs *flatFS) WriteFile(_ context.Context, op *fuseops.WriteFileOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	f, ok := fs.files[op.Inode]
	if !ok {
		return fuse.ENOENT
	}
	end := int(op.Offset) + len(op.Data)
	if end > len(f.data) {
		f.data = append(f.data, make([]byte, end-len(f.data))...)
	}
	copy(f.data[op.Offset:], op.Data)
	return nil
}

func (fs *flatFS) FlushFile(context.Context, *fuseops.FlushFileOp) error { return nil }

func (fs *flatFS) ReleaseFileHandle(context.Context, *fuseops.ReleaseFileHandleOp) error {
	return nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: jacobsa-flatfs MOUNTPOINT")
		os.Exit(2)
	}
	fs := &flatFS{
		uid:   uint32(os.Getuid()),
		gid:   uint32(os.Getgid()),
		files: map[fuseops.InodeID]*file{fuseops.RootInodeID + 1: {name: "hello", data: []byte(HelloText)}},
		next:  fuseops.RootInodeID + 2,
	}
	mounted, err := fuse.Mount(os.Args[1], fuseutil.NewFileSystemServer(fs), &fuse.MountConfig{FSName: "jacobsa-flatfs"})
	if err != nil {
		fmt.Fprintln(os.Stderr, "jacobsa-flatfs:", err)
		os.Exit(1)
	}
	if err := mounted.Join(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, "jacobsa-flatfs:", err)
		os.Exit(1)
	}
}
