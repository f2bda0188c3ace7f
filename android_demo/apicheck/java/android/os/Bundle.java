// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
// Real: extends BaseBundle implements Cloneable, Parcelable; the shell only receives one in onCreate.
package android.os;

public final class Bundle {
    private Bundle() {}
}
