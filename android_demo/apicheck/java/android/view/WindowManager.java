// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
// Real: WindowManager extends ViewManager; LayoutParams extends ViewGroup.LayoutParams and implements
// Parcelable (not used by the shell).
package android.view;

public interface WindowManager {
    class LayoutParams {
        public static final int FLAG_KEEP_SCREEN_ON = 0x00000080;

        private LayoutParams() {} // the shell only reads the flag
    }
}
